"""benchmarks/kl_by_position.py: the distances it reports, with the reference model run beside the measured one."""

import torch
import torch.nn.functional as F

from .conftest import load_benchmark, tiny_model

bench = load_benchmark("kl_by_position")


def test_distances_are_the_cross_entropy_and_the_kl_to_the_reference_per_position():
    reference, model = tiny_model(seed=0), tiny_model(seed=1)
    windows = torch.randint(0, 256, (5, 8), generator=torch.Generator().manual_seed(0))
    d = bench.distances(model, windows, reference, batch_size=2)  # 5 windows: the last batch is short

    with torch.no_grad():
        lp = model(input_ids=windows).logits.float().log_softmax(-1)
        ref = reference(input_ids=windows).logits.float().log_softmax(-1)
    ce = F.cross_entropy(lp[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1), reduction="none").view(5, 7)
    kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1)  # KL(reference || model), [5, 8]
    assert abs(d["ce"] - float(ce.mean())) < 1e-5
    assert torch.allclose(torch.tensor(d["ce_per_window"]), ce.mean(-1), atol=1e-5)
    assert abs(d["kl"] - float(kl.mean())) < 1e-5 and float(kl.mean()) > 0.01  # the two models differ
