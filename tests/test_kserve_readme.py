"""The README's "Serving without TorchServe" commands and client examples, run as written: `make serve-kserve`
and `make stop` are the command they run (python -m serving ... with this test's state folder), the ports free
ones instead of 8090/8091. Everything else, curl lines and Python examples included, is the README's text."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT, require_command


def readme_section():
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        return f.read().split("## Serving without TorchServe", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def ports():
    from serving.torchserve import free_port
    return free_port(), free_port()


def run_shell(line, ports, state, logs):
    http, grpc = ports
    serving = "%s -m serving --state-dir %s" % (sys.executable, state)
    line = line.split("  #")[0].strip()
    line = line.replace("make serve-kserve", "%s start --server kserve --http-port %d --grpc-port %d --logs %s"
                        % (serving, http, grpc, logs))
    line = line.replace("make stop", serving + " stop").replace(":8090", ":%d" % http)
    return subprocess.run(["bash", "-c", line], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_readme_commands_and_clients_as_written(tmp_path, ports):
    require_command("curl")
    section = readme_section()
    commands = [line for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines() if line.strip()]
    clients = re.findall(r"```python\n(.*?)```", section, re.S)
    assert commands[0].startswith("make serve-kserve") and commands[-1] == "make stop" and len(clients) == 2
    state, logs = tmp_path / "state", tmp_path / "logs"
    outputs = []
    try:
        for line in commands[:-1]:
            result = run_shell(line, ports, state, logs)
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            outputs.append(result.stdout)
        for code in clients:
            code = code.replace("127.0.0.1:8090", "127.0.0.1:%d" % ports[0]).replace("127.0.0.1:8091",
                                                                                "127.0.0.1:%d" % ports[1])
            result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("[b'dog' b'cat'] [[") and "e-04" in result.stdout, result.stdout
        status = run_shell("%s -m serving --state-dir %s status" % (sys.executable, state), ports, state, logs)
        assert status.returncode == 0 and "base_cnn ready, efficientnet_lite1 ready" in status.stdout, status.stdout
        second = run_shell(commands[0], ports, state, logs)  # one server at a time, whichever kind
        assert second.returncode == 2 and "the KServe server is already running" in second.stderr, second.stderr
    finally:
        stopped = run_shell(commands[-1], ports, state, logs)
    assert stopped.returncode == 0 and "the KServe server stopped" in stopped.stdout, stopped.stdout
    started, ready, metadata, answer = outputs
    assert "efficientnet_lite1 samples/test1/2124.jpg -> {\"dog\": 0.99916" in started, started
    assert json.loads(ready) == {"ready": True}, ready
    metadata = json.loads(metadata)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("image", "BYTES", [-1])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("probabilities", "FP32", [-1, 2]), ("label", "BYTES", [-1])]
    outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
    assert outputs["label"] == ["dog"] and outputs["probabilities"][1] == pytest.approx(0.999164342880249, abs=1e-6)
