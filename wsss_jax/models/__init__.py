"""Pure linen models, one file per architecture."""
