"""Datasets: discovery, captions, aspect buckets, and the synthetic images the offline demo draws."""
