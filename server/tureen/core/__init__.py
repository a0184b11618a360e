"""The core of Tureen: ingredients, the kitchen that builds blends, the repository that serves them.

Nothing in here imports grpc, protobuf or prometheus: transports and observers plug in from above.
"""
