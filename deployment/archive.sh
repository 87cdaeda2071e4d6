#!/usr/bin/env bash
# Build the TorchServe archives (.mar) of the trained models.
#
#   deployment/archive.sh                      # every shipped model (trained weights in models/) -> deployment/model-store
#   deployment/archive.sh base_cnn             # just one
#   deployment/archive.sh --export-path /tmp/store base_cnn=/tmp/run/model_base_cnn.pth
#   deployment/archive.sh --backend torch base_cnn  # PyTorch eager in the server instead of ONNX Runtime
#
# A model whose checkpoint does not exist is skipped with a message: untrained
# weights are never archived as the shipped model. Each checkpoint is loaded
# into its network first, so a wrong or corrupt file fails here, not in the server.
#
# --backend onnx (the default): the archive serves the checkpoint's ONNX export with ONNX
# Runtime, several times faster on a CPU. The export beside the checkpoint (model_NAME.onnx,
# see export_main.py) is used when it was made from these very weights; otherwise the
# checkpoint is exported again for this archive. Every export is checked against PyTorch on
# real images (probabilities within 1e-4) or the archive fails.
#   torch-model-archiver --model-name NAME --version 1.0
#     --serialized-file models/NAME/model_NAME.onnx --handler models/handler.py
#     --extra-files <the model's index_to_name.json, from its classes>,<the checkpoint's meta JSON>
#     --config-file deployment/model-config/NAME.yaml (packed as model-config.yaml)
#     --export-path deployment/model-store
# --backend torch: the original README's command (model file + state_dict, PyTorch in the
# server) plus the same two extra files:
#   torch-model-archiver --model-name NAME --version 1.0 --model-file models/NAME/NAME.py
#     --serialized-file models/NAME/model_NAME.pth --handler models/handler.py --extra-files ...
# The meta JSON is for describe and for models without an img_size buffer; the model config
# sets workers, batching and threads.
#
# An archive whose content equals the one already at the destination (the same files, byte
# for byte, only the manifest's creation time differing) is left as it is: rebuilding an
# unchanged model does not change a tracked file. One that differs replaces it, and the
# archive it replaces is kept beside it as NAME.mar.previous-<its time> (git-ignored).
#
# Exit status: 0 when at least one archive was built and nothing failed,
# 1 when nothing was archived (all skipped), 2 on usage errors or failures.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's Python (for the registry and the checkpoint check) and archiver: the virtualenv's when there is one.
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# The model names, their shipped weights and their model files come from the registry (models.MODELS),
# never from a list here; read once, since importing it imports torch (a second or two).
ALL_MODELS=()
SHIPPED_WEIGHTS=()
MODEL_FILES=()
SHIPPED_MODELS=()
while read -r name weights model_file shipped; do
    ALL_MODELS+=("$name"); SHIPPED_WEIGHTS+=("$weights"); MODEL_FILES+=("$model_file")
    if [ "$shipped" = shipped ]; then SHIPPED_MODELS+=("$name"); fi
done < <(cd "$ROOT" && "$PYTHON" -c 'from models import MODELS, shipped_models, weights_path
shipped = shipped_models()
for name, spec in MODELS.items():
    print(name, weights_path(name), spec.model_file, "shipped" if name in shipped else "-")')
if [ ${#ALL_MODELS[@]} -eq 0 ]; then
    echo "error: cannot read the model registry (models.MODELS) with $PYTHON" >&2
    exit 2
fi

# registry_fact weights|model_file NAME: the registry's value for a known model NAME.
registry_fact() {
    local i
    for i in "${!ALL_MODELS[@]}"; do
        if [ "${ALL_MODELS[$i]}" = "$2" ]; then
            if [ "$1" = weights ]; then echo "${SHIPPED_WEIGHTS[$i]}"; else echo "${MODEL_FILES[$i]}"; fi
        fi
    done
}

usage() {
    cat <<EOF
usage: $0 [options] [MODEL[=CHECKPOINT] ...]

  MODEL               one of: ${ALL_MODELS[*]} (default: those whose weights are
                      in models/: ${SHIPPED_MODELS[*]:-none})
  CHECKPOINT          weights to ship (default: models/MODEL/model_MODEL.pth); its meta
                      JSON (same name, .json) is shipped too
  --export-path DIR   where the .mar files go (default: deployment/model-store)
  --config-file FILE  model config for every archive built by this call
                      (default: deployment/model-config/MODEL.yaml)
  --version V         archive version (default: 1.0)
  --backend B         onnx (ONNX Runtime, default) | torch (PyTorch eager, the state_dict)
  --archive-format F  default | zip-store (uncompressed: faster for big test archives)
EOF
}

abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

EXPORT_PATH="$ROOT/deployment/model-store"
CONFIG_FILE=""
VERSION="1.0"
FORMAT="default"
BACKEND="onnx"
SPECS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --export-path|--config-file|--version|--archive-format|--backend)
            if [ $# -lt 2 ]; then echo "error: $1 needs a value" >&2; usage >&2; exit 2; fi
            case "$1" in
                --export-path) EXPORT_PATH="$(abspath "$2")" ;;
                --config-file) CONFIG_FILE="$(abspath "$2")" ;;
                --version) VERSION="$2" ;;
                --archive-format) FORMAT="$2" ;;
                --backend) BACKEND="$2" ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) SPECS+=("$1"); shift ;;
    esac
done
# No model named: the shipped ones, those whose trained weights are in models/ (models.shipped_models()).
[ ${#SPECS[@]} -gt 0 ] || SPECS=("${SHIPPED_MODELS[@]}")
if [ ${#SPECS[@]} -eq 0 ]; then
    echo "no trained weights in models/ to archive (train a model first with train_main.py)" >&2
    exit 1
fi
case "$FORMAT" in
    default|zip-store) ;;
    *) echo "error: --archive-format must be default or zip-store (got $FORMAT)" >&2; exit 2 ;;
esac
case "$BACKEND" in
    onnx|torch) ;;
    *) echo "error: --backend must be onnx or torch (got $BACKEND)" >&2; exit 2 ;;
esac
if [ -n "$CONFIG_FILE" ] && [ ! -f "$CONFIG_FILE" ]; then
    echo "error: no config file $CONFIG_FILE" >&2; exit 2
fi

# The archiver installed beside that Python (a virtualenv's bin/, whether or not it is .venv), else PATH's.
if [ -z "${TORCH_MODEL_ARCHIVER:-}" ]; then
    PYTHON_BIN="$(dirname "$(command -v "$PYTHON" || echo "$PYTHON")")"
    if [ -x "$PYTHON_BIN/torch-model-archiver" ]; then
        TORCH_MODEL_ARCHIVER="$PYTHON_BIN/torch-model-archiver"
    else
        TORCH_MODEL_ARCHIVER=torch-model-archiver
    fi
fi

mkdir -p "$EXPORT_PATH"
STAGE=""
cleanup() { if [ -n "$STAGE" ]; then rm -rf "$STAGE"; fi; }
trap cleanup EXIT

built=()
skipped=()
failed=()
for spec in "${SPECS[@]}"; do
    name="${spec%%=*}"
    case " ${ALL_MODELS[*]} " in
        *" $name "*) ;;
        *) echo "error: unknown model '$name' (known: ${ALL_MODELS[*]})" >&2; failed+=("$name"); continue ;;
    esac
    if [ "$name" = "$spec" ]; then  # the shipped weights, as the registry names them (models.weights_path)
        checkpoint="$ROOT/$(registry_fact weights "$name")"
    else
        checkpoint="$(abspath "${spec#*=}")"
    fi
    if [ ! -f "$checkpoint" ]; then
        echo "skipping $name: no checkpoint at $checkpoint (train it first with train_main.py;" \
             "untrained weights are never archived)" >&2
        skipped+=("$name")
        continue
    fi
    config="${CONFIG_FILE:-$ROOT/deployment/model-config/$name.yaml}"
    if [ ! -f "$config" ]; then
        echo "error: $name: no model config $config" >&2; failed+=("$name"); continue
    fi

    # Stage next to the destination (same filesystem), then rename: a reader of the
    # model store never sees half an archive. *.mar.tmp is git-ignored.
    STAGE="$(mktemp -d "$EXPORT_PATH/$name.XXXXXX.mar.tmp")"
    stem="$(basename "${checkpoint%.*}")"
    # Load the weights into the network (a wrong or corrupt file fails now) and stage the
    # meta JSON under the name the handler looks for; rebuild it from the registry's
    # defaults, with a warning, when the checkpoint came without one.
    # With --backend onnx, also stage the current ONNX export as $STAGE/$stem.onnx.
    if ! (cd "$ROOT" && "$PYTHON" - "$name" "$checkpoint" "$STAGE/$stem.json" "$BACKEND" <<'PY'
import json
import os
import shutil
import sys

from models import MODELS
from models.checkpoint import Checkpoint, CheckpointError, index_to_name_text

name, path, staged_meta, backend = sys.argv[1:5]
try:
    checkpoint = Checkpoint(name, path)
    meta = checkpoint.meta
    checkpoint.model  # loads the weights into the network: a file that does not fit it fails here
    for warning in checkpoint.label_warnings:
        print("warning: %s: labels: %s" % (name, warning), file=sys.stderr)
    # The model's own label file: its classes, as the weights say (the handler's order, pick_labels).
    with open(os.path.join(os.path.dirname(staged_meta), "index_to_name.json"), "w") as f:
        f.write(index_to_name_text(checkpoint.classes))
    if backend == "onnx":
        from models.inference import current_onnx, export_onnx
        staged_onnx = os.path.splitext(staged_meta)[0] + ".onnx"
        if current_onnx(checkpoint) is not None:
            shutil.copyfile(checkpoint.onnx_path, staged_onnx)
        else:
            print("exporting %s to ONNX (no current export beside it) ..." % path, flush=True)
            _, worst = export_onnx(checkpoint, staged_onnx)
            print("exported; largest probability difference from torch on real images: %.1e" % worst)
except (CheckpointError, RuntimeError, ImportError) as exc:
    sys.exit("error: %s: %s" % (name, str(exc).splitlines()[0]))
if not meta:  # what the checkpoint resolves (its serving size: the weights', else the registry's)
    meta = {"conv_net": name, "img_size": checkpoint.img_size, "classes": list(checkpoint.classes),
            "dropout": MODELS[name].dropout}
    print("warning: %s: no meta JSON beside %s; assuming the defaults %s" % (name, path, meta),
          file=sys.stderr)
with open(staged_meta, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write("\n")
PY
    ); then
        failed+=("$name"); rm -rf "$STAGE"; STAGE=""; continue
    fi
    cp "$config" "$STAGE/model-config.yaml"
    mkdir "$STAGE/out" "$STAGE/tmp"

    if [ "$BACKEND" = onnx ]; then
        model_args=(--serialized-file "$STAGE/$stem.onnx")
    else
        model_args=(--model-file "$ROOT/$(registry_fact model_file "$name")"
                    --serialized-file "$checkpoint")
    fi
    echo "archiving $name ($BACKEND) from $checkpoint"
    # The archiver stages its files in $TMPDIR/<model name>: a private TMPDIR, so that two runs archiving the
    # same model at once (two checkouts, a test and a benchmark) cannot take each other's files.
    if TMPDIR="$STAGE/tmp" "$TORCH_MODEL_ARCHIVER" --model-name "$name" --version "$VERSION" \
            "${model_args[@]}" \
            --handler "$ROOT/models/handler.py" \
            --extra-files "$STAGE/index_to_name.json,$STAGE/$stem.json" \
            --config-file "$STAGE/model-config.yaml" \
            --archive-format "$FORMAT" \
            --export-path "$STAGE/out"; then
        if "$PYTHON" - "$STAGE/out/$name.mar" "$EXPORT_PATH/$name.mar" <<'PY'
import json
import sys
import zipfile


def content(path):
    """Every member's bytes, the manifest without its creation time."""
    try:
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist()}
    except (OSError, zipfile.BadZipFile):
        return None
    manifest = json.loads(files.get("MAR-INF/MANIFEST.json", b"{}"))
    manifest.pop("createdOn", None)
    files["MAR-INF/MANIFEST.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


sys.exit(0 if content(sys.argv[1]) == content(sys.argv[2]) else 1)
PY
        then
            echo "unchanged $EXPORT_PATH/$name.mar (same content; left as it is)"
        else
            # Never replace an archive by surprise (the shipped ones included): as training does with a
            # model, the one there is kept, hard-linked under a name TorchServe's "all" and the
            # Dockerfile's *.mar do not pick up, before the new one is renamed over it.
            if [ -f "$EXPORT_PATH/$name.mar" ]; then
                kept="$EXPORT_PATH/$name.mar.previous-$(date -r "$EXPORT_PATH/$name.mar" +%Y%m%d-%H%M%S)"
                ln -f "$EXPORT_PATH/$name.mar" "$kept"
                echo "kept the previous $name.mar as $kept"
            fi
            mv -f "$STAGE/out/$name.mar" "$EXPORT_PATH/$name.mar"
            echo "built $EXPORT_PATH/$name.mar"
        fi
        built+=("$name")
    else
        echo "error: torch-model-archiver failed for $name" >&2
        failed+=("$name")
    fi
    rm -rf "$STAGE"
    STAGE=""
done

echo "archived: ${built[*]:-none}; skipped (no checkpoint): ${skipped[*]:-none}; failed: ${failed[*]:-none}"
if [ ${#failed[@]} -gt 0 ]; then exit 2; fi
if [ ${#built[@]} -eq 0 ]; then exit 1; fi
