"""The job field table: every setting of a job declared once, as data, and what is derived from it.

:data:`FIELDS` drives the command line's options, the AUTOMATIC1111 request mapping and infotext, the
native API's schema (``/docs``), batch-file columns, the web page's form and the PNG record. Nothing
here imports torch: the command line parses its arguments from this table alone.
"""

from stable_cascade.fields.field import FRONT_ENDS, LIST_KINDS, Field, FrontEnd, Kind
from stable_cascade.fields.table import (
    A1111_SAMPLERS,
    ALIASES,
    BY_NAME,
    CONTROL_TYPES,
    DTYPES,
    EMPHASES,
    FIELDS,
    IMAGE_TASKS,
    PRIOR_TASKS,
    STAGE_KEYS,
    TASKS,
    Task,
    defaults,
)

__all__ = [
    "A1111_SAMPLERS",
    "ALIASES",
    "BY_NAME",
    "CONTROL_TYPES",
    "DTYPES",
    "EMPHASES",
    "FIELDS",
    "FRONT_ENDS",
    "IMAGE_TASKS",
    "LIST_KINDS",
    "PRIOR_TASKS",
    "STAGE_KEYS",
    "TASKS",
    "Field",
    "FrontEnd",
    "Kind",
    "Task",
    "defaults",
]
