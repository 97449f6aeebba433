"""Run by test_zo_multiprocess under `accelerate launch --num_processes 2 --cpu`: trains a tiny
ZeroQAT model and writes each process's trained weights, to check they are bit-identical."""

import sys
from pathlib import Path

import torch
from peft import get_peft_model

from zqat_peft import ZeroQATConfig, ZOTrainer, ZOTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import tiny_model  # noqa: E402
from tests.test_zo import RepeatedBatch  # noqa: E402

out = Path(sys.argv[1])
model = get_peft_model(tiny_model("llama"), ZeroQATConfig(w_bits=4, group_size=32, trainable="lightweight"))
args = ZOTrainingArguments(
    output_dir=str(out), per_device_train_batch_size=2, max_steps=5, learning_rate=1e-3, save_strategy="no",
    report_to=[], disable_tqdm=True, use_cpu=True, ddp_backend="gloo",
    zo_step="absolute",  # the test compares the recorded coefficients with raw projected gradients
)
trainer = ZOTrainer(model=model, args=args, train_dataset=RepeatedBatch(n=8))
seen = []
step = trainer.training_step


def recording_step(model, inputs, num_items_in_batch=None):
    seen.append(inputs["input_ids"].clone())
    return step(model, inputs, num_items_in_batch)


trainer.training_step = recording_step
trainer.train()
torch.save(seen, out / f"inputs-rank{args.process_index}.pt")
state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
torch.save(state, out / f"weights-rank{args.process_index}.pt")
torch.save(trainer.zo_optimizer.trajectory.grads, out / f"grads-rank{args.process_index}.pt")
torch.save(trainer.zo_optimizer.trajectory.state_dict(), out / f"trajectory-rank{args.process_index}.pt")
