"""What to forget and what the teacher is asked instead (docs/method.md section 3, the table of terms).

Override modes: a fixed class; a mapping {forget class: override class}; 'random' (a uniform
non-forget class per sample); 'classifier' (a pseudo-label of the fake score's denoised estimate,
argmax or sampled, with the forget classes masked out).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForgetSpec:
    forget: list[int]
    remain: list[int]
    mode: str                                   # fixed | mapping | random | classifier
    mapping: dict[int, int] = field(default_factory=dict)
    classifier: object = None
    classifier_mode: str = "argmax"
    device: torch.device = torch.device("cpu")

    @classmethod
    def parse(cls, forget, override, n_classes: int, classifier_path=None, classifier_mode="argmax",
              device=torch.device("cpu")) -> "ForgetSpec":
        forget = [forget] if isinstance(forget, int) else list(forget)
        for c in forget:
            if not isinstance(c, int) or not 0 <= c < n_classes:
                raise ValueError(f"forget class {c!r} is out of range [0, {n_classes - 1}]")
        if len(set(forget)) != len(forget):
            raise ValueError(f"forget classes {forget} contain duplicates")
        remain = [c for c in range(n_classes) if c not in forget]
        if not remain:
            raise ValueError("every class is forgotten: nothing is left to remain")
        spec = cls(forget, remain, "fixed", device=device)
        if not forget:
            return spec
        if isinstance(override, bool):
            raise ValueError(f"sfd.override {override!r} is not a class, a mapping, 'random' or 'classifier'")
        if isinstance(override, int):
            spec.mapping = {c: cls._check_override(override, forget, n_classes) for c in forget}
        elif isinstance(override, dict):
            spec.mode = "mapping"
            keys = {int(k) for k in override}
            if keys != set(forget):
                raise ValueError(f"sfd.override mapping must have exactly the forget classes {forget} as keys, "
                                 f"got {sorted(keys)}")
            spec.mapping = {int(k): cls._check_override(v, forget, n_classes) for k, v in override.items()}
        elif override == "random":
            spec.mode = "random"
        elif override == "classifier":
            if classifier_mode not in ("argmax", "sample"):
                raise ValueError(f"sfd.classifier_mode must be argmax or sample, got {classifier_mode!r}")
            if not classifier_path:
                raise ValueError("sfd.override=classifier needs sfd.classifier=<classifier checkpoint>")
            from ..classifiers import load_classifier
            spec.mode, spec.classifier_mode = "classifier", classifier_mode
            spec.classifier = load_classifier(classifier_path, device)[0]
        else:
            raise ValueError(f"sfd.override {override!r} is not a class, a mapping, 'random' or 'classifier'")
        return spec

    @staticmethod
    def _check_override(c, forget, n_classes) -> int:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < n_classes:
            raise ValueError(f"override class {c!r} is out of range [0, {n_classes - 1}]")
        if c in forget:
            raise ValueError(f"override class {c} is itself a forget class {forget}")
        return c

    def _pick(self, classes: list[int], n: int) -> torch.Tensor:
        table = torch.tensor(classes, device=self.device)
        return table[torch.randint(len(classes), (n,), device=self.device)]

    def sample_remain(self, n: int) -> torch.Tensor:
        """Remain labels: uniform over the kept classes (the label distribution of D_r)."""
        return self._pick(self.remain, n)

    def sample_forget(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(forget labels, override labels); override is None in classifier mode (decided later)."""
        label = self._pick(self.forget, n)
        if self.mode in ("fixed", "mapping"):
            lut = torch.zeros(max(self.forget) + 1, dtype=torch.long, device=self.device)
            for f, o in self.mapping.items():
                lut[f] = o
            return label, lut[label]
        if self.mode == "random":
            return label, self._pick(self.remain, n)
        return label, None

    @torch.no_grad()
    def pseudo_label(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier label of denoised images, forget classes excluded."""
        logits = self.classifier(images.clamp(-1, 1)).float()
        logits[:, self.forget] = float("-inf")
        if self.classifier_mode == "argmax":
            return logits.argmax(1)
        return torch.distributions.Categorical(logits=logits).sample()
