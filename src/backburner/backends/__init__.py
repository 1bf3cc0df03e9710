"""Inference engines behind one protocol; they know nothing of storage or HTTP serving."""
