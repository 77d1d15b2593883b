"""Datasets: discovery, captions, buckets, and the synthetic images the offline demo draws."""
