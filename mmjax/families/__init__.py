"""Model families: how a run config becomes a model (`registry`, `base.Family`), and the
config sections of the parts they share (`decoder`: config.model, `tower`: config.vision)."""
