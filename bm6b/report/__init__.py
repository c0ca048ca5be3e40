"""Run report (HTML + PNG figures) and shard inspection for curate output folders."""
