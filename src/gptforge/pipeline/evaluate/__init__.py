"""The evaluation stage, in parts: metrics for the three tasks, generation, judges and reports.

- pretrain: token-weighted loss and perplexity on validation and test.
- classify: accuracy, per-class and macro precision/recall/F1, confusion matrices (JSON + PNG) per split.
- instruct: batched KV-cache generation over the test split, response extraction, ROUGE-L F1, exact
  match, response length, and optionally an LLM judge (`pipeline.judge`).

`metrics` holds pure functions over predictions; `inference` runs a model over data; `report` writes
metrics.json, report.md and plots (each evaluation dir atomically); `classify`, `pretrain` and
`instruct` tie them together per task; `stage` has the entry points, `evaluate_checkpoint(cfg)` and
`evaluate_responses_file(cfg)`, which the CLI and the pipeline runner call with an `EvaluateConfig`.
"""

from gptforge.pipeline.evaluate.classify import evaluate_classifier
from gptforge.pipeline.evaluate.inference import (
    classify_texts,
    generate_responses,
    label_names,
    lm_metrics,
    predict_classes,
)
from gptforge.pipeline.evaluate.instruct import load_responses, score_responses
from gptforge.pipeline.evaluate.metrics import (
    classification_metrics,
    normalize_text,
    response_scores,
    summarize_response_scores,
)
from gptforge.pipeline.evaluate.report import (
    REFERENCE_RESPONSES,
    plot_confusion_matrix,
    plot_histogram,
    render_report,
    write_classification_report,
    write_lm_report,
    write_responses_report,
)
from gptforge.pipeline.evaluate.stage import (
    TASKS,
    evaluate_checkpoint,
    evaluate_responses_file,
    infer_task,
    output_dir,
    trained_data,
)

__all__ = [
    "REFERENCE_RESPONSES",
    "TASKS",
    "classification_metrics",
    "classify_texts",
    "evaluate_checkpoint",
    "evaluate_classifier",
    "evaluate_responses_file",
    "generate_responses",
    "infer_task",
    "label_names",
    "lm_metrics",
    "load_responses",
    "normalize_text",
    "output_dir",
    "plot_confusion_matrix",
    "plot_histogram",
    "predict_classes",
    "render_report",
    "response_scores",
    "score_responses",
    "summarize_response_scores",
    "trained_data",
    "write_classification_report",
    "write_lm_report",
    "write_responses_report",
]
