"""Stage-two models: the multimodal teacher, RGB-only students, adapters and the resampler."""

from synesthesia.models.outputs import StudentOutput, TeacherOutput
from synesthesia.models.students import STUDENTS, Student, build_student
from synesthesia.models.teacher import MultimodalTeacher

__all__ = ["STUDENTS", "MultimodalTeacher", "Student", "StudentOutput", "TeacherOutput", "build_student"]
