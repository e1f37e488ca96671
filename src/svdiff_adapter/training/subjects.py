"""Subjects of a training run: where their images are, their prompt, identifier token and class.

A subject comes from `--instance_data_dir/--instance_prompt` (one subject), from `--subject` specs
(``"dir=imgs/dog,prompt=a photo of sks dog,class=dog"``, repeatable) or from a `--concepts_list` JSON/YAML file in
the layout of diffusers' DreamBooth script (``instance_data_dir``, ``instance_prompt``, ``class_data_dir``,
``class_prompt``; we also read ``class`` and ``token``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .images import TrainingDataError


# Words that cannot be an identifier: "a photo of dog" has none.
_NOT_IDENTIFIERS = {"a", "an", "the", "of", "photo", "picture", "image", "my", "this", "one", "in", "on", "with"}


@dataclass
class Subject:
    """One subject: instance images + prompt, identifier token (e.g. ``sks``), class word and prior data."""

    instance_data_dir: str
    instance_prompt: str
    class_name: Optional[str] = None
    token: Optional[str] = None
    class_data_dir: Optional[str] = None
    class_prompt: Optional[str] = None

    def __post_init__(self):
        if not self.instance_prompt or not self.instance_prompt.strip():
            raise TrainingDataError(f"Subject {self.instance_data_dir!r} has an empty instance prompt.")
        words = _words(self.instance_prompt)
        if self.token is not None:
            if self.token.lower() not in words:
                raise TrainingDataError(
                    f"The instance prompt {self.instance_prompt!r} does not contain the identifier token "
                    f"{self.token!r}; write e.g. 'a photo of {self.token} {self.class_name or 'dog'}'."
                )
        elif self.class_name is not None:
            self.token = infer_identifier(self.instance_prompt, self.class_name)
        if self.class_prompt is None and self.class_name is not None:
            self.class_prompt = _remove_word(self.instance_prompt, self.token) if self.token else None

    @property
    def label(self) -> str:
        """``"sks dog"``: identifier and class as they appear in composed (Cut-Mix) prompts."""
        return " ".join(part for part in (self.token, self.class_name) if part)


def _words(prompt: str) -> list[str]:
    return re.findall(r"[\w\[\]<>\-']+", prompt.lower())


def _remove_word(prompt: str, word: str) -> str:
    return re.sub(rf"(?<![\w\[\]]){re.escape(word)}(?![\w\[\]])\s*", "", prompt, count=1).strip()


def infer_identifier(prompt: str, class_name: str) -> str:
    """The word right before the class word: ``"a photo of sks dog"``, class ``dog`` → ``"sks"``."""
    original = re.findall(r"[\w\[\]<>\-']+", prompt)
    words = [w.lower() for w in original]
    class_words = _words(class_name)
    for index in range(len(words) - len(class_words) + 1):
        if words[index:index + len(class_words)] == class_words:
            if index > 0 and words[index - 1] not in _NOT_IDENTIFIERS:
                return original[index - 1]
            break
    else:
        raise TrainingDataError(
            f"The instance prompt {prompt!r} does not contain the class word {class_name!r}; write e.g. "
            f"'a photo of sks {class_name}' or give token=."
        )
    raise TrainingDataError(
        f"The instance prompt {prompt!r} has no identifier token before the class word {class_name!r}; write e.g. "
        f"'a photo of sks {class_name}' (a rare word such as sks, zwx or [V1] names the subject) or give token=."
    )


def check_identifier(prompt: str, class_prompt: Optional[str]) -> None:
    """With prior preservation the instance prompt must name the subject with a word the class prompt lacks."""
    if class_prompt is None:
        return
    extra = [w for w in _words(prompt) if w not in set(_words(class_prompt))]
    if not extra:
        raise TrainingDataError(
            f"The instance prompt {prompt!r} has no identifier token that the class prompt {class_prompt!r} lacks; "
            f"write e.g. 'a photo of sks dog' for the class prompt 'a photo of dog'."
        )


_SPEC_KEYS = {"dir": "instance_data_dir", "instance_data_dir": "instance_data_dir", "prompt": "instance_prompt",
              "instance_prompt": "instance_prompt", "class": "class_name", "token": "token",
              "class_dir": "class_data_dir", "class_data_dir": "class_data_dir", "class_prompt": "class_prompt"}


def parse_subject(spec: str) -> Subject:
    """``"dir=imgs/dog,prompt=a photo of sks dog,class=dog[,token=sks][,class_dir=...][,class_prompt=...]"``.

    Prompts may contain commas: a comma starts a new field only when followed by ``key=``.
    """
    fields: dict[str, str] = {}
    for part in re.split(r",\s*(?=\w+=)", spec.strip()):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _SPEC_KEYS:
            raise TrainingDataError(
                f"Cannot parse --subject {spec!r}: unknown field {key!r}; use "
                "'dir=...,prompt=a photo of sks dog,class=dog' (optional token=, class_dir=, class_prompt=)."
            )
        fields[_SPEC_KEYS[key]] = value.strip()
    for required in ("instance_data_dir", "instance_prompt"):
        if required not in fields:
            raise TrainingDataError(f"--subject {spec!r} lacks {required.split('_')[-1]}=.")
    return Subject(**fields)


def load_concepts_list(path: str) -> list[Subject]:
    """A JSON or YAML list of concepts (diffusers' `--concepts_list` layout, plus optional `class` and `token`)."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        entries = yaml.safe_load(text)
    else:
        entries = json.loads(text)
    if not isinstance(entries, list) or not entries:
        raise TrainingDataError(f"--concepts_list {path!r} should hold a non-empty list of concepts.")
    subjects = []
    for entry in entries:
        unknown = set(entry) - set(_SPEC_KEYS)
        if unknown:
            raise TrainingDataError(f"--concepts_list {path!r}: unknown key(s) {sorted(unknown)} in {entry}.")
        subjects.append(Subject(**{_SPEC_KEYS[k]: v for k, v in entry.items()}))
    return subjects
