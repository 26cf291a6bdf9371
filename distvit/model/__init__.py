"""The model: built from timm with the configured surgery (`build`, `surgery`), described by its record
(`record`), reported (`report`) and exported for timm (`export`)."""
