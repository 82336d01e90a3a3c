"""Recipes as stage lists (`stages`), the stage kinds that prepare a stage's data
(`kinds`, `pairs`, `select`, listed in `registry`) and the results of a finished recipe."""
