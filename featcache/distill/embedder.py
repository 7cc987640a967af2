"""A distilled student as a model in the user's own code (``featcache.load_model``), and its trunk in
torchvision's own key names."""

from __future__ import annotations

from pathlib import Path

import torch

from featcache.distill.load import load_student
from featcache.distill.students import STUDENTS, Student, _torchvision, normalize
from featcache.evaluation.embedder import Embedder


class StudentModel(Embedder):
    """A finished distill run: the student's 2048-d BN feature of each image's view 0, L2-normalised, as
    ``featcache eval --model student:RUN`` computes it."""

    def __init__(self, student: Student, image_size: tuple[int, int], run: Path, device: torch.device) -> None:
        super().__init__(image_size, device)
        self.student, self.run = student, run

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.student(normalize(pixels))

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's weights under torchvision's key names: they load into ``torchvision.models.<arch>()`` with
        ``strict=False``, only torchvision's own head (``fc``, ``classifier``) missing. featcache's head (FC to
        2048, the BN neck, the ID classifier) is not in it."""
        body = _torchvision(STUDENTS.get(self.student.arch).tv_name)
        twin = Student(self.student.arch, self.student.classifier.out_features, body)  # shares body's modules
        twin.load_state_dict(self.student.state_dict())  # so the trunk's weights land in body, under its names
        head = {k for k in body.state_dict() if k.split(".")[0] in ("fc", "classifier")}
        return {k: v.detach().clone().cpu() for k, v in body.state_dict().items() if k not in head}


def load_student_model(run: Path, device: str) -> StudentModel:
    """A finished distill run as a ``StudentModel`` in eval mode on ``device``."""
    student, _, meta = load_student(run, device=str(device))
    return StudentModel(student, tuple(meta["image_size"]), Path(run), torch.device(device)).eval()
