"""Error-driven data selection: from a student's validation errors to a training subset.

  1. errors  = gaps.collect_errors(val_records, student_predictions)
  2. profile = gaps.gap_profile(errors, teachers.FactTeacher())   # or ModelTeacher(...)
  3. indices = retrieve.select(pool_skills, pool_emb, failed_emb, profile, budget, seed)
  4. retrieve.write_selection(path, indices, meta); fine-tune on pool[indices]

Each step is a pure, deterministic function of its inputs; every selection returns
exactly `budget` distinct pool indices or raises a one-line ValueError.
"""
from mmjax.select.gaps import ErrorRecord, Teacher, collect_errors, gap_profile, judge, normalise_answer
from mmjax.select.retrieve import (allocate, nearest_neighbours, read_selection, select, select_by_embedding,
                                   select_by_skills, select_random, write_selection)
from mmjax.select.teachers import FactTeacher, ModelTeacher, match_facts, record_questions

__all__ = ["ErrorRecord", "Teacher", "collect_errors", "gap_profile", "judge", "normalise_answer",
           "allocate", "nearest_neighbours", "read_selection", "select", "select_by_embedding",
           "select_by_skills", "select_random", "write_selection", "FactTeacher", "ModelTeacher",
           "match_facts", "record_questions"]
