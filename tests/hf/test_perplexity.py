"""Under OTR, Axolotl's own trainer logs no ``ppl`` / ``eval_ppl`` made from the OTR loss
(``trainer/perplexity.py``; issue 35, item 5): Axolotl's ``AxolotlTrainer`` in this
process (0.19 writes the keys in its ``log``; 0.21 reads ``reports_token_perplexity``).
"""

from __future__ import annotations

from datasets import Dataset
from transformers import AutoModelForCausalLM, default_data_collator

from axolotl_otr.objective import Objective, OTRSettings
from axolotl_otr.trainer import install_otr
from axolotl_otr.trainer.perplexity import LogsWithoutLossPerplexity
from tests.support.trainer_setup import LogRecorder, make_examples

VOCAB = 512


def _dataset(n: int, seed: int) -> Dataset:
    rows = make_examples(n, VOCAB, seed=seed)
    return Dataset.from_list([{k: v.tolist() for k, v in row.items()} for row in rows])


def _logged_keys(tiny_dir, tmp_path, otr: bool) -> list[set[str]]:
    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.core.training_args import AxolotlTrainingArguments

    args = AxolotlTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        max_steps=2, logging_steps=1, eval_strategy="steps", eval_steps=2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = AxolotlTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir / "model"), args=args,
        train_dataset=_dataset(8, 0), eval_dataset=_dataset(4, 1),
        data_collator=default_data_collator, eval_data_collator=default_data_collator,
    )  # fmt: skip
    if otr:
        install_otr(trainer, OTRSettings(Objective(estimator="exact")))
    recorder = LogRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    # What the callbacks saw (printed, sent to trackers) and what trainer_state.json keeps.
    return [set(log) for log in recorder.logs + trainer.state.log_history]


def test_axolotl_logs_no_perplexity_of_the_otr_loss(tiny_dir, tmp_path):
    plain = _logged_keys(tiny_dir, tmp_path / "plain", otr=False)
    assert any("ppl" in keys for keys in plain) and any("eval_ppl" in keys for keys in plain)
    otr = _logged_keys(tiny_dir, tmp_path / "otr", otr=True)
    assert not any({"ppl", "eval_ppl"} & keys for keys in otr), otr
    # The cross-entropy's perplexity is there instead, for training and evaluation.
    assert any("otr/ppl" in keys for keys in otr) and any("eval_otr/ppl" in keys for keys in otr)


def test_the_log_dict_ignores_only_the_two_keys():
    logs = LogsWithoutLossPerplexity({"loss": -0.6})
    logs["ppl"], logs["eval_ppl"], logs["otr/ppl"] = 0.5, 0.5, 40.0
    assert logs == {"loss": -0.6, "otr/ppl": 40.0}
