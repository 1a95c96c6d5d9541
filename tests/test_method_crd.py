"""CRD: the contrast against a plain-loop float64 reference and the official RepDistiller numbers,
the normalisation constant, the negatives, the memory banks across --resume and under DDP,
gradient flow, recipe defaults and CLI runs."""

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from kdzoo.methods.crd import draw_negatives

from kdzoo.build import validate
from kdzoo.checkpoint import read_checkpoint
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo, create_model
from kdzoo.registry import get_method, register_method

from .conftest import tiny_config
from .reference import mean_ce

CRD = get_method("crd")


def _info(name, dim, n=20, labels=None):
    return ModelInfo(name, 3, 16, {"embedding": (dim,), "logits": (3,)}, train_size=n, train_labels=labels)


def _method(config=None, n=20, labels=None, s_dim=6, t_dim=5):
    labels = torch.arange(n) % 3 if labels is None else labels
    method = CRD(config or CRD.Config(feat_dim=4, nce_k=7))
    method.setup(_info("s", s_dim, n, labels), _info("t", t_dim, n, labels))
    return method


# -- plain-loop reference of one training step (float64) -----------------------------------------

def _norm(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _ref_step(bank_s, bank_t, z, v_s, v_t, index, negatives, tau, momentum, n_data):
    """(loss, z, bank_s, bank_t) after one step, with explicit loops."""
    idx = [[i] + list(neg) for i, neg in zip(index, negatives)]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    s_sc = [[math.exp(dot(bank_t[j], v_s[b]) / tau) for j in row] for b, row in enumerate(idx)]
    t_sc = [[math.exp(dot(bank_s[j], v_t[b]) / tau) for j in row] for b, row in enumerate(idx)]
    if z is None:
        count = len(idx) * len(idx[0])
        z = [sum(map(sum, s_sc)) / count * n_data, sum(map(sum, t_sc)) / count * n_data]
    noise = (len(idx[0]) - 1) / n_data
    loss = 0.0
    for scores, zz in ((s_sc, z[0]), (t_sc, z[1])):
        total = 0.0
        for row in scores:
            p = [x / zz for x in row]
            total += math.log(p[0] / (p[0] + noise + 1e-7)) + sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
        loss += -total / len(scores)
    bank_s, bank_t = [list(r) for r in bank_s], [list(r) for r in bank_t]
    for b, i in enumerate(index):
        bank_s[i] = _norm([momentum * x + (1 - momentum) * y for x, y in zip(bank_s[i], v_s[b])])
        bank_t[i] = _norm([momentum * x + (1 - momentum) * y for x, y in zip(bank_t[i], v_t[b])])
    return loss, z, bank_s, bank_t


def test_two_training_steps_match_loop_reference():
    g = torch.Generator().manual_seed(3)
    method = _method(CRD.Config(feat_dim=4, nce_k=5, nce_t=0.5, nce_m=0.3))
    bank_s, bank_t, z = method.memory_student.tolist(), method.memory_teacher.tolist(), None
    assert method.z.tolist() == [-1.0, -1.0]
    for step in range(2):
        v_s = torch.nn.functional.normalize(torch.randn(4, 4, generator=g), dim=1)
        v_t = torch.nn.functional.normalize(torch.randn(4, 4, generator=g), dim=1)
        index = torch.tensor([[2, 9, 0, 17], [9, 4, 11, 1]][step])
        negatives = torch.randint(0, 20, (4, 5), generator=g)
        negatives[0, 0] = index[1]  # a negative that is another row's positive (updated this step)
        got = method.contrast(v_s, v_t, index, negatives)
        loss, z, bank_s, bank_t = _ref_step(bank_s, bank_t, z, v_s.tolist(), v_t.tolist(), index.tolist(),
                                            negatives.tolist(), 0.5, 0.3, 20)
        assert got.item() == pytest.approx(loss, rel=1e-5)
        assert method.z.tolist() == pytest.approx(z, rel=1e-6)  # set on the first step, then kept
        assert torch.allclose(method.memory_student, torch.tensor(bank_s, dtype=torch.float32), atol=1e-6)
        assert torch.allclose(method.memory_teacher, torch.tensor(bank_t, dtype=torch.float32), atol=1e-6)


def test_eval_mode_changes_no_state():
    method = _method()
    method.eval()
    before = {k: v.clone() for k, v in method.state_dict().items() if k != "_extra_state"}
    v = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    loss = method.contrast(v, v, torch.tensor([0, 1, 2]), torch.randint(0, 20, (3, 7)))
    assert torch.isfinite(loss)
    after = method.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


# -- parity with the official code --------------------------------------------------------------
# HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403: crd/criterion.py CRDLoss with
# crd/memory.py ContrastMemory, run in float64 by /tmp/official-vidcrd/parity.py (AliasMethod.cuda made a
# no-op). opt: s_dim 6, t_dim 5, feat_dim 4, nce_k 7, nce_t 0.07, nce_m 0.5, n_data 20.
# torch.Generator().manual_seed(1), float64 draws in this order: embed_s weight randn(4,6), bias 0.1·randn(4),
# embed_t weight randn(4,5), bias 0.1·randn(4); memory_v1, memory_v2 = rand(20,4)·2s − s, s = 1/√(4/3);
# then per step f_s = randn(4,6), f_t = randn(4,5); idx and contrast_idx fixed (below); two steps.
OFFICIAL_IDX = [3, 7, 0, 12]
OFFICIAL_NEG = [[1, 5, 9, 14, 19, 2, 2], [0, 3, 11, 15, 18, 6, 4], [7, 8, 13, 16, 17, 1, 10], [12, 3, 5, 6, 9, 0, 19]]
OFFICIAL_LOSS = [27.846228723802646, 19.969798668908]
OFFICIAL_Z = [3356595.6538766692, 69398.67301647786]  # Z_v1 (student anchor), Z_v2 (teacher anchor)
OFFICIAL_MEMORY_V1 = [-0.394406035443, 0.648432812976, 0.208530932626, -0.61684164613, 0.611062277126, 0.011822809427,
                      -0.788570502701, -0.067968205229, 0.60563177444, -0.605010982826, 0.453312976057, -0.248352995122,
                      0.137917830354, 0.227333746063, -0.949529310038, -0.166409523013]
OFFICIAL_MEMORY_V2 = [-0.85426580569, -0.402075174696, -0.309815847694, 0.112158939188, -0.043859562884,
                      -0.542674025599, -0.616351240722, 0.568939705719, 0.288527582755, -0.577051293309,
                      0.439437215998, -0.625026857084, -0.28173520677, 0.011914169465, 0.368115902333,
                      -0.885987589237]


def test_parity_with_official_crdloss():
    g = torch.Generator().manual_seed(1)
    method = _method(CRD.Config(feat_dim=4, nce_k=7, nce_t=0.07, nce_m=0.5))
    with torch.no_grad():
        for lin in (method.embed_s, method.embed_t):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
        stdv = 1.0 / math.sqrt(4 / 3)
        method.memory_student.copy_(torch.rand(20, 4, generator=g, dtype=torch.float64) * 2 * stdv - stdv)
        method.memory_teacher.copy_(torch.rand(20, 4, generator=g, dtype=torch.float64) * 2 * stdv - stdv)
    index, negatives = torch.tensor(OFFICIAL_IDX), torch.tensor(OFFICIAL_NEG)
    for step in range(2):
        f_s = torch.randn(4, 6, generator=g, dtype=torch.float64).float()
        f_t = torch.randn(4, 5, generator=g, dtype=torch.float64).float()
        out = StepOutputs(NetOutputs(torch.zeros(4, 3), {"embedding": f_s}), torch.zeros(4, dtype=torch.long),
                          NetOutputs(torch.zeros(4, 3), {"embedding": f_t}), index=index)
        v_s, v_t = method.embed(out)
        assert method.contrast(v_s, v_t, index, negatives).item() == pytest.approx(OFFICIAL_LOSS[step], rel=1e-5)
        if step == 0:
            assert method.z.tolist() == pytest.approx(OFFICIAL_Z, rel=1e-5)
    assert method.memory_student[index].flatten().tolist() == pytest.approx(OFFICIAL_MEMORY_V1, abs=1e-5)
    assert method.memory_teacher[index].flatten().tolist() == pytest.approx(OFFICIAL_MEMORY_V2, abs=1e-5)


def test_loss_terms_weights_and_optional_kd():
    method = _method(CRD.Config(feat_dim=4, nce_k=7, crd_weight=0.5, ce_weight=0.3, kd_weight=1.0))
    g = torch.Generator().manual_seed(2)
    logits, t_logits = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    out = StepOutputs(NetOutputs(logits, {"embedding": torch.randn(4, 6, generator=g)}), torch.tensor([0, 1, 2, 0]),
                      NetOutputs(t_logits, {"embedding": torch.randn(4, 5, generator=g)}), index=torch.tensor([1, 2, 3, 4]))
    state = {k: (v.clone() if torch.is_tensor(v) else dict(v)) for k, v in method.state_dict().items()}
    terms = method.loss(out)
    assert set(terms) == {"ce", "crd", "kd"}
    assert terms["ce"].item() == pytest.approx(0.3 * mean_ce(logits.tolist(), [0, 1, 2, 0]), rel=1e-6)
    method.load_state_dict(state)  # banks, Z (unset) and the negatives' generator as before the step
    crd = method.contrast(*method.embed(out), out.index)
    assert terms["crd"].item() == pytest.approx(0.5 * crd.item(), rel=1e-6)
    assert "kd" not in _method().loss(out)


# -- negatives ----------------------------------------------------------------------------------------

def _sorted_by_class(labels):
    counts = torch.bincount(labels)
    return torch.argsort(labels, stable=True), torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def test_other_class_negatives_without_replacement():
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1, 0])  # 12 images, 4 per class
    by_class, start = _sorted_by_class(labels)
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, 2, 2])
    neg = draw_negatives(4, 8, 12, g, rows, by_class, start)  # K = 8 = every other-class image
    for r, c in enumerate(rows.tolist()):
        assert sorted(neg[r].tolist()) == sorted(i for i in range(12) if labels[i] != c)
    neg = draw_negatives(4, 5, 12, g, rows, by_class, start)
    for r, c in enumerate(rows.tolist()):
        assert len(set(neg[r].tolist())) == 5 and all(labels[i] != c for i in neg[r].tolist())
    # the draws follow the generator's state alone
    state = g.get_state()
    a = draw_negatives(4, 5, 12, g, rows, by_class, start)
    g.set_state(state)
    assert torch.equal(a, draw_negatives(4, 5, 12, g, rows, by_class, start))


def test_with_replacement_when_asked_or_when_k_exceeds_the_candidates():
    labels = torch.arange(30) % 3  # 20 candidates per class
    by_class, start = _sorted_by_class(labels)
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([0, 1, 2])
    for k, replacement in ((200, False), (200, True), (15, True)):
        neg = draw_negatives(3, k, 30, g, rows, by_class, start, replacement)
        assert neg.shape == (3, k)
        for r in range(3):
            assert all(labels[i] != r for i in neg[r].tolist())
            if k > 20:
                assert len(set(neg[r].tolist())) == 20  # every candidate drawn, so with replacement
    # uniform over the candidates: 40000 draws over 20 images, each within 5 % of 2000
    counts = torch.bincount(draw_negatives(1, 40000, 30, g, torch.tensor([1]), by_class, start, True)[0], minlength=30)
    assert counts[1::3].sum() == 0 and ((counts[labels != 1] - 2000).abs() < 100).all()
    # "any": every image, with replacement
    neg = draw_negatives(2, 500, 30, g)
    assert neg.min() == 0 and neg.max() == 29


# -- setup and settings -----------------------------------------------------------------------------

def test_bank_initialisation_and_state():
    method = _method(CRD.Config(feat_dim=9, nce_k=7), n=50)
    stdv = 1 / math.sqrt(9 / 3)
    for bank in (method.memory_student, method.memory_teacher):
        assert bank.shape == (50, 9) and bank.abs().max() <= stdv and bank.abs().max() > 0.9 * stdv
    assert not torch.equal(method.memory_student, method.memory_teacher)
    keys = set(method.state_dict())
    assert {"memory_student", "memory_teacher", "z", "_extra_state"} <= keys and "_labels" not in keys
    assert set(method.buffers_kept_in_sync) == {"memory_student", "memory_teacher", "z", "_labels", "_by_class",
                                                "_class_start"}


def test_defaults_are_repdistillers_cifar_setting():
    c = CRD.Config()
    assert (c.crd_weight, c.ce_weight, c.kd_weight, c.temperature, c.feat_dim, c.nce_k, c.nce_t, c.nce_m,
            c.negatives, c.sample_with_replacement) == (0.8, 1.0, 0.0, 4.0, 128, 16384, 0.07, 0.5, "other_class", False)


def test_recipe_defaults_and_set_wins():
    run_cifar = RunConfig(method="crd", dataset="cifar100", model="cifar_resnet8x4", teacher="cifar_resnet32x4")
    assert CRD.recipe_defaults(run_cifar, {}) == {}
    run_in = RunConfig(method="crd", dataset="imagefolder", model="resnet18", teacher="resnet34")
    assert CRD.recipe_defaults(run_in, {}) == {"sample_with_replacement": True}
    c = validate(replace(run_in, method_settings={"sample_with_replacement": "false", "kd_weight": "1"})).config
    assert (c.sample_with_replacement, c.kd_weight, c.crd_weight) == (False, 1.0, 0.8)


@pytest.mark.parametrize("settings", [{"negatives": "same_class"}, {"nce_m": 1.5}, {"nce_k": 0}, {"nce_t": 0.0},
                                      {"crd_weight": -1.0}, {"feat_dim": 0}])
def test_bad_settings_are_user_errors(settings):
    with pytest.raises(UserError):
        CRD(CRD.Config(**settings))


def test_setup_needs_the_training_set():
    with pytest.raises(UserError, match="training-set size"):
        CRD().setup(ModelInfo("s", 3, 16, {"embedding": (4,)}), ModelInfo("t", 3, 16, {"embedding": (4,)}))
    with pytest.raises(UserError, match="negatives=any"):
        CRD().setup(_info("s", 4, 10, None), _info("t", 4, 10, None))
    with pytest.raises(UserError, match="same class"):
        CRD().setup(_info("s", 4, 10, torch.zeros(10, dtype=torch.long)), _info("t", 4, 10))
    method = CRD(CRD.Config(negatives="any"))
    method.setup(_info("s", 4, 10, None), _info("t", 4, 10, None))
    assert method.memory_student.shape == (10, 128)


# -- gradients ----------------------------------------------------------------------------------------

def test_gradient_reaches_student_and_embeds_never_the_teacher_or_banks():
    method = _method()
    f_s, f_t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    out = StepOutputs(NetOutputs(torch.randn(4, 3), {"embedding": f_s}), torch.tensor([0, 1, 2, 0]),
                      NetOutputs(torch.randn(4, 3), {"embedding": f_t}), index=torch.tensor([0, 5, 6, 7]))
    method.loss(out)["crd"].backward()
    assert f_s.grad.abs().sum() > 0 and f_t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert not method.memory_student.requires_grad and not method.memory_teacher.requires_grad


# -- resume and DDP ------------------------------------------------------------------------------------

@register_method("test_crd_stop_at_2")
class CRDStopAtTwo(CRD):
    """CRD that raises the stop flag at global step 2 (the first of epoch 2, of 2-step epochs), the way SIGTERM does."""

    flag: StopFlag | None = None

    def loss(self, out):
        if out.step == 2 and CRDStopAtTwo.flag is not None and not CRDStopAtTwo.flag:
            CRDStopAtTwo.flag.signal_name = "SIGTERM"
        return super().loss(out)


def test_resume_restores_banks_z_and_negatives_exactly(tmp_path, quiet_console):
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model("test_resnet", 10, 16).state_dict(), teacher)
    cfg = tiny_config(tmp_path, method="test_crd_stop_at_2", teacher="test_resnet", teacher_checkpoint=str(teacher),
                      epochs=2, train_size=32, test_size=16, method_settings={"nce_k": "20", "feat_dim": "8"})
    CRDStopAtTwo.flag = None
    run(replace(cfg, run_name="full"), console=quiet_console)
    CRDStopAtTwo.flag = StopFlag()
    with pytest.raises(Interrupted):
        run(replace(cfg, run_name="cut"), console=quiet_console, stop=CRDStopAtTwo.flag)
    CRDStopAtTwo.flag = None
    run(replace(cfg, run_name="cut"), resume=True, console=quiet_console)
    full = read_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    cut = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")
    for key, value in full["method"].items():
        if key == "_extra_state":
            assert cut["method"][key]["seed"] == value["seed"]
            assert torch.equal(cut["method"][key]["rng_state"], value["rng_state"])
        else:
            assert torch.equal(cut["method"][key], value), key
    assert full["method"]["z"].min() > 0
    for key, value in full["student"].items():
        assert torch.equal(cut["student"][key], value), key


NO_AUGMENT = '''
from kdzoo import register_method
from kdzoo.methods.crd import CRD

@register_method("test_crd_no_augment")
class CRDNoAugment(CRD):
    """CRD without augmentation, so that 2 processes see exactly the images 1 process sees."""

    def prepare_batch(self, batch, augment):
        return batch
'''


def test_two_process_banks_equal_the_single_process_banks(tmp_path):
    plugin = tmp_path / "crd_no_augment.py"
    plugin.write_text(NO_AUGMENT)
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model("test_convnext", 10, 32).state_dict(), teacher)
    common = ["run", "--plugin", str(plugin), "--method", "test_crd_no_augment", "--model", "test_convnext",
              "--teacher", "test_convnext", "--teacher-checkpoint", str(teacher), "--input-size", "32",
              "--train-size", "48", "--test-size", "8", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
              "--workers", "0", "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0",
              "--set", "nce_k=12", "--set", "feat_dim=8", "--output", str(tmp_path / "runs")]
    assert main([*common, "--run-name", "single"]) == 0
    ddp = subprocess.run([sys.executable, "-m", "kdzoo", *common, "--nproc", "2", "--run-name", "ddp"],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "ddp" / "result.json").read_text())["world_size"] == 2
    one = read_checkpoint(tmp_path / "runs" / "single" / "last.pt")["method"]
    two = read_checkpoint(tmp_path / "runs" / "ddp" / "last.pt")["method"]
    assert one["_extra_state"]["seed"] == two["_extra_state"]["seed"]
    assert torch.equal(one["_extra_state"]["rng_state"], two["_extra_state"]["rng_state"])  # the same draws
    for key in ("memory_student", "memory_teacher", "z", "embed_s.weight", "embed_t.weight"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


# -- CLI -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """Untrained teacher checkpoints (what is tested is the method's wiring, not the teacher)."""
    folder = tmp_path_factory.mktemp("crd-cli")
    torch.manual_seed(0)
    for name in ("test_resnet", "test_convnext"):
        torch.save(create_model(name, 10, 32).state_dict(), folder / f"{name}.pt")
    return folder


def _cli(output, student, teacher, *extra):
    name = f"crd-{teacher}-{student}"
    args = ["run", "--method", "crd", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-checkpoint",
            str(output / f"{teacher}.pt"), "--output", str(output), "--run-name", name, *extra]
    return main(args), output / name


@pytest.mark.parametrize("student,teacher", [("test_resnet", "test_resnet"), ("test_efficientnet", "test_resnet"),
                                             ("test_convnext", "test_resnet"), ("test_vit", "test_convnext")])
def test_cli_runs(shared_output, student, teacher):
    code, folder = _cli(shared_output, student, teacher)
    assert code == 0
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    state = read_checkpoint(folder / "last.pt")["method"]
    assert state["memory_student"].shape == (32, 128) and state["z"].min() > 0


def test_cli_refuses_segmentation(shared_output, capsys):
    code, _ = _cli(shared_output, "test_resnet", "test_resnet", "--task", "seg")
    assert code == 2
    assert "crd" in capsys.readouterr().err


# -- what kdzoo gives the method: the training set, and DDP leaving its banks alone -------------------

def test_model_info_carries_the_training_set_size_and_labels():
    from kdzoo.data.loaders import InMemoryLoader, TorchLoader, dataset_labels
    from kdzoo.models import model_info

    targets = torch.tensor([4, 1, 1, 0, 2, 3])
    loader = InMemoryLoader(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), targets, 2, shuffle=True)
    info = model_info(create_model("test_resnet", 5, 8), "test_resnet", 5, 8, ("embedding",), loader)
    assert info.train_size == 6 and torch.equal(info.train_labels, targets)
    assert model_info(create_model("test_resnet", 5, 8), "test_resnet", 5, 8).train_size is None

    class Folder(torch.utils.data.Dataset):
        targets = [3, 1, 4, 1, 5, 9]

        def __len__(self):
            return 6

    subset = torch.utils.data.Subset(torch.utils.data.Subset(Folder(), [5, 4, 3, 2]), [0, 2])
    assert dataset_labels(subset).tolist() == [9, 1]
    assert TorchLoader(subset, 1, shuffle=False, workers=0).labels().tolist() == [9, 1]
    assert dataset_labels(torch.utils.data.TensorDataset(torch.zeros(3, 1))) is None  # no targets list
    masks = InMemoryLoader(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), 1, shuffle=False)
    assert masks.labels() is None


def test_ddp_leaves_the_banks_to_the_method(tmp_path):
    import torch.distributed as dist

    from kdzoo.distributed import data_parallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        method = _method()
        ddp = data_parallel(torch.nn.Linear(2, 2), method, lambda *a: None, torch.device("cpu"), False)
        assert {f"method.{n}" for n in ("memory_student", "memory_teacher", "z", "_labels")} <= ddp.parameters_to_ignore
        plain = data_parallel(torch.nn.BatchNorm1d(2), get_method("vid")(), lambda *a: None, torch.device("cpu"), False)
        assert not plain.parameters_to_ignore  # other methods' buffers (BatchNorm statistics) are broadcast as before
    finally:
        dist.destroy_process_group()
