"""The model: built from timm with the configured surgery (`build`, `surgery`), described by its record
(`record`), described in words (`plan_text`) and exported for timm (`export`)."""
