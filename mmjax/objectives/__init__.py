"""Objectives: what a train step minimises and the batches it needs (`base.Objective`), by
name (`registry`): 'sft', 'dpo', 'visft'."""
