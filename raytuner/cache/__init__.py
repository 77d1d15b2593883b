"""The latent and text cache: Parquet shards on local disk, a shared filesystem or object storage."""
