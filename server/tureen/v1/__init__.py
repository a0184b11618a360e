"""Generated from protos/tureen/v1 by protos/generate.py; do not edit."""
