"""Helpers of opd's shipped lm-eval tasks (the YAMLs beside this file name them with !function).

`local_json` reads the JSONL files a task names in `dataset_kwargs.data_files`, a relative path
being relative to this folder, so the tasks run from any working directory; an absolute path
points a task at the real files. The scoring is the harness's own (GSM8K's regex filters in the
YAML, MATH's and IFEval's functions re-exported here), so the numbers are the harness's.
"""

from pathlib import Path

import datasets
from lm_eval.tasks.minerva_math.utils import doc_to_text as math_doc_to_text  # noqa: F401
from lm_eval.tasks.minerva_math.utils import list_fewshot_samples as math_fewshot_samples  # noqa: F401
from lm_eval.tasks.minerva_math.utils import process_docs as math_process_docs  # noqa: F401
from lm_eval.tasks.minerva_math.utils import process_results as math_process_results  # noqa: F401

HERE = Path(__file__).parent


def local_json(data_files: dict, **_metadata) -> datasets.DatasetDict:
    """The splits of `data_files` ({split: path}) as a DatasetDict, read by datasets' json builder."""
    files = {split: str(path if Path(path).is_absolute() else HERE / path) for split, path in data_files.items()}
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"lm-eval task data not found: {missing[0]}")
    return datasets.load_dataset("json", data_files=files)


def ifeval_process_results(doc, results):
    # imported here: lm-eval's IFEval module looks for NLTK's Punkt tables when it is imported
    from lm_eval.tasks.ifeval.utils import process_results

    return process_results(doc, results)


def ifeval_agg_inst_level_acc(items):
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    return agg_inst_level_acc(items)
