"""What a deployment needs: preprocessing, labels, artifact metadata, and the inference backends."""

__version__ = "0.2.0"
