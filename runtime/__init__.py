"""What a deployment needs: preprocessing, labels, artifact metadata, and the inference backends."""
