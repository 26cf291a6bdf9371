"""Training: the Trainer (`trainer`) and the components it is made of, each owning its config section."""
