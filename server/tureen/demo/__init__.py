"""The embedded demo: a soup of real fine-tunes on scikit-learn's bundled handwritten digits."""
