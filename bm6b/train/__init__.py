"""The bundled trainer: contrastive pretraining on bm6b shards with the grouped ITC loss (GBA-ITC)."""
