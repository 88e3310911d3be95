"""integration suite: bad input ends with a one-line error that names the problem (file,
line:column, key or section), a non-zero exit, and no damage to files already written."""
import hashlib
import os
import shutil
from testlib import check, finish, run, run_plain, tiny_config, tmpdir

d = tmpdir("dcmoe-cli-")


def expect_error(args, must_contain, what):
    p = run_plain(args)
    err = p.stderr.strip().splitlines()
    line = err[-1] if err else ""
    ok = p.returncode != 0 and all(s in line for s in must_contain)
    check(ok, f"{what}: exit {p.returncode}, message: {line!r}")
    return p


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


base = tiny_config(os.path.join(d, "good.yaml"), d, "good")
good = open(base).read()

# truncated configs: cut inside a quoted string (YAML syntax error) and inside a key
trunc = os.path.join(d, "truncated.yaml")
with open(trunc, "w") as f:
    f.write(good[:good.index("out_dir:")] + 'out_dir: "' + d[:5])
expect_error(["train", trunc], [trunc + ":", "YAML syntax error"], "config truncated inside a string")
with open(trunc, "w") as f:
    f.write(good[:good.index("n_head") + 4])
line = good[:good.index("n_head")].count("\n") + 1
expect_error(["train", trunc], [trunc + ":", "YAML syntax error", f"at {line}:3"], "config truncated inside a key")

# misspelled key with a suggestion
miss = os.path.join(d, "misspelled.yaml")
with open(miss, "w") as f:
    f.write(good.replace("n_experts:", "n_expert:"))
line = [i + 1 for i, l in enumerate(good.splitlines()) if "n_experts:" in l][0]
expect_error(["train", miss], [f"{miss}:{line}:", "moe.n_expert", "n_experts"], "misspelled key")

# mistyped value
typed = os.path.join(d, "mistyped.yaml")
with open(typed, "w") as f:
    f.write(good.replace("d_model: 32", "d_model: big"))
line = [i + 1 for i, l in enumerate(good.splitlines()) if "d_model: 32" in l][0]
expect_error(["train", typed], [f"{typed}:{line}:", "model.d_model", "integer"], "mistyped value")

# YAML 1.1 boolean
yes = os.path.join(d, "yes.yaml")
with open(yes, "w") as f:
    f.write(good.replace("log:\n", "log:\n  swmr: yes\n"))
expect_error(["train", yes], [yes + ":", "log.swmr", "true or false"], "yes/no boolean")

# --set with a bad value
expect_error(["train", base, "--set", "moe.top_k=0"], ["moe.top_k", "--set"], "--set out of range")
expect_error(["train", base, "--set", "run.gemm_dtype=bf16"], ["run.gemm_dtype=bf16", "run.backend=cpu", "fp32"],
             "bf16 GEMMs refused on the CPU backend")

# missing config file, missing data
expect_error(["train", os.path.join(d, "nope.yaml")], ["nope.yaml", "cannot open"], "missing config file")
expect_error(["train", base, "--set", f"data.path={d}/no-such-corpus"], ["no-such-corpus"], "missing data folder")

# a config that sets no key (empty, comments only, {}) names the file and points at the defaults
# (it used to train the default 37M-parameter model without a word)
for name, text in (("empty.yaml", ""), ("comments.yaml", "# model:\n#   d_model: 64\n"), ("braces.yaml", "{}\n")):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    expect_error(["train", path], [path + ": no keys", "dcmoe config"], f"config without keys ({name})")
    expect_error(["config", path], [path + ": no keys"], f"dcmoe config of a file without keys ({name})")
p = run_plain(["config"])
check(p.returncode == 0 and "model:\n  d_model: 256\n" in p.stdout and "checkpoint:\n" in p.stdout,
      "dcmoe config (no file) still prints the defaults")

# unknown section: the message lists every section
sec = os.path.join(d, "section.yaml")
with open(sec, "w") as f:
    f.write(good + "optimiser:\n  lr: 1\n")
expect_error(["train", sec], [sec + ":", "unknown section 'optimiser'",
                              "run, data, model, moe, clustering, topology, parallel, precision, offload, train, "
                              "log, checkpoint, sim, sweep"], "unknown section lists all sections")

# a good run, then protect its outputs
p = run(["train", base, "--quiet"], ranks=1)
check(p.returncode == 0, "tiny run trains")
run_dir = os.path.join(d, "good")
h5 = os.path.join(run_dir, "metrics.h5")
if p.returncode == 0:
    h_before = sha(h5)
    # starting the same run again refuses to overwrite it
    expect_error(["train", base], ["already holds a run", "--resume"], "refuses to overwrite a run")
    check(sha(h5) == h_before, "metrics.h5 untouched by the refused start")
    # dcmoe eval runs on the run's backend: without a GPU, run.backend=cuda is an error naming
    # CUDA (an eval that ignored the key would succeed on the CPU), the stored formats with
    # offloading included (they run on the device: no refusal before the backend starts)
    if shutil.which("nvidia-smi") is None:
        expect_error(["eval", base, "--set", "run.backend=cuda"], ["cuda"], "eval honours run.backend=cuda")
        p = expect_error(["eval", base, "--set", "run.backend=cuda", "--precision", "stored", "--set",
                          "offload.enabled=true"], ["run.backend=cuda"], "eval --precision stored with offloading starts cuda")
        check("--precision stored" not in p.stderr and "offload" not in p.stderr,
              "eval: stored formats and offloading are not refused on cuda")
    # training-time offloading stays host-only (a new run name: the good run must not be touched)
    expect_error(["train", base, "--set", "run.name=cuda-offload", "--set", "run.backend=cuda", "--set", "offload.enabled=true"],
                 ["offload.enabled", "run.backend=cuda"], "train: offloading refused on cuda")
    ck = os.path.join(run_dir, "ckpt", "step_00000012")
    mb = os.path.join(ck, "model.bin")
    data = bytearray(open(mb, "rb").read())
    data[len(data) // 2] ^= 0x5A
    open(mb, "wb").write(bytes(data))
    c_before = sha(mb)
    # a run killed after its final checkpoint, before DONE: --resume verifies the checkpoint
    # (a resume of a DONE run does nothing, so DONE goes aside for this check)
    done = os.path.join(run_dir, "DONE")
    os.rename(done, done + ".aside")
    p = run_plain(["train", base, "--resume"])
    check(p.returncode != 0 and mb in p.stderr and "checksum mismatch" in p.stderr,
          f"corrupt checkpoint on --resume: exit {p.returncode}, stderr: {p.stderr.strip()[-400:]!r}")
    os.rename(done + ".aside", done)
    expect_error(["eval", base], [mb, "checksum mismatch"], "corrupt checkpoint on eval")
    check(sha(h5) == h_before, "metrics.h5 untouched after the failed resume")
    check(sha(mb) == c_before, "corrupt checkpoint left as it was (evidence kept)")
    # truncated checkpoint
    open(mb, "wb").write(bytes(data[: len(data) // 3]))
    expect_error(["eval", base], [mb, "truncated"], "truncated checkpoint")
    shutil.rmtree(run_dir)

for cmd in ("train", "eval", "config"):
    p = run_plain([cmd, "--help"])
    check(p.returncode == 0 and "usage: dcmoe " + cmd in p.stdout, f"dcmoe {cmd} --help")
p = run_plain(["version"])
check(p.returncode == 0 and "dcmoe" in p.stdout, "dcmoe version")
finish()
