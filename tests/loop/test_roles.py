"""The loop reaches the roles only through their contracts (opd/roles.py), so a served engine can
replace an in-process one without the loop changing."""

import ast
from pathlib import Path

import pytest

from helpers import sampler, tiny
from opd.config import LossConfig, ModelConfig, OptimConfig, SamplingConfig
from opd.learner.learner import Learner
from opd.roles import Learner as LearnerContract, Sampler as SamplerContract, Teacher as TeacherContract
from opd.roles import check_output_sizes
from opd.teacher.hf import HFTeacher
from opd.teacher.remote import RemoteTeacher

OPD = Path(__file__).resolve().parents[2] / "opd"


def test_every_implementation_states_its_contract():
    model, tok = tiny()
    assert isinstance(sampler(model, tok), SamplerContract)
    assert isinstance(Learner(model, OptimConfig(), LossConfig(), 1, 1), LearnerContract)
    in_process = HFTeacher(tiny()[0], tok)
    assert isinstance(in_process, TeacherContract)
    assert isinstance(in_process.as_sampler(SamplingConfig()), SamplerContract)  # it can sample: the ceiling
    served = RemoteTeacher(ModelConfig(url="http://127.0.0.1:9"), check=False)  # nothing contacted
    try:
        assert isinstance(served, TeacherContract)
        assert not served.full_distribution and served.output_size is None and served.cost is None
        assert served.as_sampler(SamplingConfig()) is None  # a scorer only
        served.verify(100)  # nothing to check locally
    finally:
        served.close()


def test_components_reach_the_teacher_through_its_contract():
    """components.build asks the teacher for a sampler instead of testing its class."""
    assert "isinstance" not in (OPD / "components.py").read_text()


def attributes_used(path: Path) -> set[str]:
    return {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}


@pytest.mark.parametrize("module", ["loop.py", "evaluation.py"])
def test_the_loop_and_evaluation_never_reach_into_a_roles_model(module):
    used = attributes_used(OPD / module)
    assert not used & {"model", "head", "decoder", "parameters"}, used & {"model", "head", "decoder", "parameters"}


def test_no_role_imports_the_loop():
    for folder in ("sampler", "teacher", "learner", "losses"):
        for path in (OPD / folder).glob("*.py"):
            imported = {node.module for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, ast.ImportFrom) and node.module}
            assert "opd.loop" not in imported and "opd.components" not in imported, path


def test_the_output_size_check_refuses_exact_losses_on_heads_of_different_sizes():
    model, tok = tiny()
    learner = Learner(model, OptimConfig(), LossConfig(), 1, 1)
    padded, _ = tiny(hidden=48)
    padded.resize_token_embeddings(len(tok) + 16)
    teacher = HFTeacher(padded, tok)
    assert check_output_sizes(learner, teacher, needs_full_distribution=False) is False  # the sampled loss trains
    with pytest.raises(ValueError, match=f"student has {len(tok)} output logits and the teacher {len(tok) + 16}"):
        check_output_sizes(learner, teacher, needs_full_distribution=True)
    assert check_output_sizes(learner, HFTeacher(tiny(hidden=48)[0], tok), needs_full_distribution=True)
