"""Capability fields and their evaluation: `Field`, the one row plan (`rows`), the reference peft-switch evaluator
and the segmented batch evaluator."""

from engine.fields.evaluator import FieldEvaluator, PeftFieldEvaluator
from engine.fields.field import STUDENT, Field, student_field

__all__ = ["STUDENT", "Field", "FieldEvaluator", "PeftFieldEvaluator", "student_field"]
