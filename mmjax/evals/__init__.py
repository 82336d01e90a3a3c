"""Evaluations: caption atomic-fact metrics (`captions`)."""
