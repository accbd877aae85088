"""The ops of omni-moe."""
