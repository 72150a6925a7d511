"""Where source shards come from: the procedural scenes, and ingest of existing datasets."""
