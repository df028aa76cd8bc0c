"""Data side of elmjax: conversation sources, prepared shards and the input pipeline."""
