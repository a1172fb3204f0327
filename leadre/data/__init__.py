"""Stage 0-1: the data model (schemas), the synthetic world, dataset adapters, ingest."""
