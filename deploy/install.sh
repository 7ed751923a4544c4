#!/usr/bin/env bash
# Install (or remove) the rdedge runtime as a systemd service on a Jetson, an NVIDIA GPU box or a CPU box.
#
#   sudo deploy/install.sh --bundle ./bundle --config ./line1.yaml     # install or upgrade
#   deploy/install.sh --dry-run --bundle ./bundle                       # print every step, change nothing
#   sudo deploy/install.sh --uninstall [--purge]                        # remove (keep config + spool unless --purge)
#
# What it does, in order (each step is printed as "+ command"; --dry-run prints without running):
#   1. system user "rdedge" (group rdedge, member of video)
#   2. venv (default /opt/rdedge/venv) with --system-site-packages, so JetPack's TensorRT and its OpenCV
#      (GStreamer build) stay visible; installs rdedge from this checkout with the extra for the platform:
#      Jetson -> rdedge[jetson] (never an OpenCV wheel: refuses to go on if one appears), GPU box (--gpu) ->
#      rdedge[cpu,trt], otherwise rdedge[cpu]
#   3. the bundle -> /opt/rdedge/bundles/<model_id>-<manifest hash>/, engines built there on GPU platforms
#      (`rdedge build-engines`), then the symlink /opt/rdedge/bundles/current is switched atomically.
#      The spool (/var/lib/rdedge) is never touched by an upgrade.
#   4. /etc/rdedge/config.yaml (an existing one is never overwritten: the new one goes to config.yaml.new)
#   5. /etc/systemd/system/rdedge.service, daemon-reload, enable, start (or restart when already running)
# Running it again with the same inputs changes nothing but the reinstall of the rdedge package.
#
# pip honours the usual PIP_INDEX_URL / PIP_FIND_LINKS / PIP_NO_INDEX variables for offline plants.
set -euo pipefail

readonly UNIT_NAME=rdedge.service
readonly SERVICE_USER=rdedge
readonly DEFAULT_VENV=/opt/rdedge/venv
readonly BUNDLES_DIR=/opt/rdedge/bundles
readonly CONF_DIR=/etc/rdedge
readonly STATE_DIR=/var/lib/rdedge
readonly CACHE_DIR=/var/cache/rdedge
readonly UNIT_DIR=/etc/systemd/system

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
DRY_RUN=0
BUNDLE=""
CONFIG=""
VENV=$DEFAULT_VENV
UNINSTALL=0
PURGE=0
USE_SYSTEMCTL=1
SKIP_PIP=0
PLATFORM=auto
PYTHON=""
WORK_DIR=""
FRESH_EXAMPLE_CONFIG=0
NO_PASSWORD=0

usage() {
  cat <<EOF
usage: $(basename "$0") [options]

  --bundle DIR        bundle written by 'rdedge export' (manifest.json + ONNX parts) to install and activate
  --config FILE       config to install as $CONF_DIR/config.yaml (default: deploy/config.example.yaml;
                      an existing config is kept and FILE goes to config.yaml.new)
  --venv DIR          virtual environment (default $DEFAULT_VENV)
  --source DIR        rdedge source to pip-install (default: this checkout, $SRC_DIR)
  --python EXE        interpreter for the venv (default /usr/bin/python3: JetPack's TensorRT/OpenCV live there)
  --platform P        auto | jetson | gpu | cpu (default auto: Jetson if /etc/nv_tegra_release or the
                      nvidia-jetpack package exists, else cpu)
  --gpu               same as --platform gpu (x86 + NVIDIA GPU: rdedge[cpu,trt], engines built on the box)
  --root DIR          install into DIR instead of / (tests, image builds): every path is prefixed, no user
                      is created and systemctl only enables (systemctl --root)
  --no-systemctl      do not call systemctl at all
  --skip-pip          do not create the venv, pip-install, verify imports, check the config or build engines
  --dry-run           print every step instead of running it
  --uninstall         stop, disable and remove the unit and the venv; keep $CONF_DIR, $STATE_DIR and bundles
  --purge             with --uninstall: also remove $CONF_DIR, $STATE_DIR, $CACHE_DIR, /opt/rdedge and the user
  -h, --help          this text
EOF
}

die() {
  printf 'install.sh: error: %s\n' "$*" >&2
  exit 1
}

note() {
  printf '==> %s\n' "$*"
}

# Print a step as "+ cmd arg..." (single-quoted where needed, so it can be pasted) and run it unless --dry-run.
run() {
  local line="" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '+%s\n' "$line"
  if [[ $DRY_RUN -eq 0 ]]; then
    "$@"
  fi
}

# A path inside the target root.
p() {
  printf '%s%s' "$ROOT" "$1"
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --bundle) BUNDLE=${2:?--bundle needs a directory}; shift 2 ;;
      --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
      --venv) VENV=${2:?--venv needs a directory}; shift 2 ;;
      --source) SRC_DIR=${2:?--source needs a directory}; shift 2 ;;
      --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
      --platform) PLATFORM=${2:?--platform needs auto, jetson, gpu or cpu}; shift 2 ;;
      --gpu) PLATFORM=gpu; shift ;;
      --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
      --no-systemctl) USE_SYSTEMCTL=0; shift ;;
      --skip-pip) SKIP_PIP=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --uninstall) UNINSTALL=1; shift ;;
      --purge) PURGE=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown option: $1" ;;
    esac
  done

  case $PLATFORM in auto | jetson | gpu | cpu) ;; *) die "--platform must be auto, jetson, gpu or cpu" ;; esac
  [[ $VENV =~ ^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$ ]] ||
    die "--venv must be an absolute path below / (letters, digits, . _ - /; no trailing slash): $VENV"
  [[ /$VENV/ != */./* && /$VENV/ != */../* ]] || die "--venv must not contain . or .. components: $VENV"
  [[ $PURGE -eq 0 || $UNINSTALL -eq 1 ]] || die "--purge only goes with --uninstall"
  [[ -d $SRC_DIR ]] || die "--source $SRC_DIR is not a directory"
  SRC_DIR=$(cd "$SRC_DIR" && pwd)
  if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || die "--root $ROOT is not a directory"
    ROOT=$(cd "$ROOT" && pwd)
    if [[ $ROOT == / ]]; then ROOT=""; fi
  fi
  if [[ -n $BUNDLE ]]; then
    [[ -f $BUNDLE/manifest.json ]] || die "--bundle $BUNDLE has no manifest.json (is it a bundle from 'rdedge export'?)"
    BUNDLE=$(cd "$BUNDLE" && pwd)
  fi
  if [[ -n $CONFIG ]]; then
    [[ -f $CONFIG ]] || die "--config $CONFIG is not a file"
  fi
  if [[ -z $PYTHON ]]; then
    if [[ -x /usr/bin/python3 ]]; then PYTHON=/usr/bin/python3; else PYTHON=$(command -v python3 || true); fi
  fi
  [[ -n $PYTHON ]] || die "no python3 found; pass --python"
  if [[ -z $ROOT && $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    die "installing into / needs root (use sudo), or try --dry-run / --root DIR"
  fi
}

detect_platform() {
  [[ $PLATFORM == auto ]] || return 0
  if [[ -e $(p /etc/nv_tegra_release) ]]; then
    PLATFORM=jetson
  elif [[ -z $ROOT ]] && dpkg-query -W -f='${Status}' nvidia-jetpack 2>/dev/null | grep -q 'ok installed'; then
    PLATFORM=jetson
  else
    PLATFORM=cpu
  fi
}

# ---------------------------------------------------------------------------------------------------- install

ensure_user() {
  if [[ -n $ROOT ]]; then
    note "alternate root: not creating user '$SERVICE_USER' (do it on the target, or rerun without --root)"
    return
  fi
  if getent passwd "$SERVICE_USER" >/dev/null; then
    note "user $SERVICE_USER exists"
  else
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
      --shell /usr/sbin/nologin --comment "rdedge inspection runtime" "$SERVICE_USER"
  fi
  # video: V4L2 cameras, and the GPU device nodes on a Jetson. The unit adds it too (SupplementaryGroups=);
  # membership here makes `sudo -u rdedge ...` debugging see the same devices.
  if getent group video >/dev/null; then
    if ! id -nG "$SERVICE_USER" 2>/dev/null | tr ' ' '\n' | grep -qx video; then
      run usermod --append --groups video "$SERVICE_USER"
    fi
  else
    note "warning: no 'video' group on this system; cameras and the Jetson GPU may be inaccessible"
  fi
}

# The extra that matches the platform. Jetson: nothing that could pull an OpenCV or TensorRT wheel.
pip_extra() {
  case $PLATFORM in
    jetson) printf 'jetson' ;;
    gpu) printf 'cpu,trt' ;;
    *) printf 'cpu' ;;
  esac
}

ensure_venv() {
  local venv_py
  venv_py=$(p "$VENV")/bin/python
  if [[ $SKIP_PIP -eq 1 ]]; then
    note "--skip-pip: not creating $VENV nor installing rdedge into it"
    return
  fi
  if [[ -x $venv_py ]]; then
    note "venv $VENV exists"
  else
    run "$PYTHON" -m venv --system-site-packages "$(p "$VENV")"
  fi
  run "$venv_py" -m pip install --upgrade pip

  local extra
  extra=$(pip_extra)
  if [[ $PLATFORM == jetson ]]; then
    # JetPack's OpenCV was compiled against the system numpy 1.x: numpy 2 in the venv would break `import cv2`.
    # cuda-python installs from an aarch64 wheel; the CUDA toolkit stays on PATH for anything built against it.
    local constraints="$WORK_DIR/constraints.txt"
    printf 'numpy<2\n' >"$constraints"
    note "PATH=/usr/local/cuda/bin:\$PATH CUDA_ROOT=/usr/local/cuda for the pip install"
    PATH="/usr/local/cuda/bin:$PATH" CUDA_ROOT=/usr/local/cuda \
      run "$venv_py" -m pip install --constraint "$constraints" "${SRC_DIR}[$extra]"
    run "$venv_py" -m pip install --no-deps --force-reinstall "$SRC_DIR"
  else
    run "$venv_py" -m pip install "${SRC_DIR}[$extra]"
    # Same version number as an earlier install from this checkout: force the new code in, leave deps alone.
    run "$venv_py" -m pip install --no-deps --force-reinstall "$SRC_DIR"
  fi
  verify_imports "$venv_py"
}

verify_imports() {
  local venv_py=$1
  if [[ $PLATFORM == jetson ]]; then
    # Refuse a venv in which pip pulled an OpenCV wheel: it has no GStreamer/NVMM support and shadows JetPack's.
    printf '+ %q -m pip list --format=freeze | grep -i ^opencv   # must find nothing\n' "$venv_py"
    if [[ $DRY_RUN -eq 0 ]] && "$venv_py" -m pip list --format=freeze 2>/dev/null | grep -qi '^opencv'; then
      die "pip installed an OpenCV wheel into $VENV; remove it ($venv_py -m pip uninstall opencv-python" \
        "opencv-python-headless opencv-contrib-python) so that JetPack's cv2 (GStreamer build) is used"
    fi
    local mod path venv_real
    venv_real=$(realpath -m "$(p "$VENV")")
    for mod in cv2 tensorrt; do
      printf "+ %q -c '%s'   # must resolve outside %s (JetPack)\n" "$venv_py" "import $mod; print($mod.__file__)" "$VENV"
      [[ $DRY_RUN -eq 0 ]] || continue
      path=$("$venv_py" -c "import $mod; print($mod.__file__)") ||
        die "the venv cannot import $mod: install JetPack's python3-libnvinfer / OpenCV (apt install nvidia-jetpack)"
      path=$(realpath "$path")
      [[ $path != "$venv_real"/* ]] || die "$mod comes from the venv ($path), not from JetPack: pip must not install it"
      note "$mod from $path"
    done
    run "$venv_py" -c 'import cv2, re, sys; sys.exit(not re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()))' ||
      note "warning: this cv2 has no GStreamer support: gstreamer camera sources (CSI) will not open"
  elif [[ $PLATFORM == gpu ]]; then
    run "$venv_py" -c 'import cv2, onnxruntime, tensorrt; print("cv2", cv2.__version__, "tensorrt", tensorrt.__version__)'
  else
    run "$venv_py" -c 'import cv2, onnxruntime; print("cv2", cv2.__version__, "onnxruntime", onnxruntime.__version__)'
  fi
}

install_bundle() {
  [[ -n $BUNDLE ]] || {
    note "no --bundle: leaving $BUNDLES_DIR as it is"
    return
  }
  local model_id digest name bundles dst current_target=""
  model_id=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["model_id"])' "$BUNDLE/manifest.json") ||
    die "cannot read model_id from $BUNDLE/manifest.json"
  model_id=$(printf '%s' "$model_id" | tr -c 'A-Za-z0-9._-' '_')
  digest=$(sha256sum "$BUNDLE/manifest.json" | cut -c1-12)
  name="$model_id-$digest"
  bundles=$(p "$BUNDLES_DIR")
  dst="$bundles/$name"

  if [[ -d $dst ]]; then
    note "bundle $name already installed"
  else
    # Copy and build engines under a temporary name, then rename: a half-built bundle is never 'installed'.
    run mkdir -p "$bundles"
    run rm -rf "$dst.partial"
    run cp -a "$BUNDLE" "$dst.partial"
    if [[ $PLATFORM != cpu ]]; then
      if [[ $SKIP_PIP -eq 1 ]]; then
        note "--skip-pip: not building TensorRT engines (run '$VENV/bin/rdedge build-engines $BUNDLES_DIR/$name')"
      else
        # Engines are specific to the GPU and the TensorRT version: always build them on the device itself.
        run "$(p "$VENV")/bin/rdedge" build-engines "$dst.partial"
      fi
    fi
    if [[ -z $ROOT ]]; then
      # readable by the service only: a trained model is the plant's property
      run chown -R root:"$SERVICE_USER" "$dst.partial"
      run chmod -R u=rwX,g=rX,o= "$dst.partial"
    else
      run chmod -R u=rwX,go=rX "$dst.partial"
    fi
    run mv "$dst.partial" "$dst"
  fi

  if [[ -L $bundles/current ]]; then
    current_target=$(readlink "$bundles/current")
  fi
  if [[ $current_target == "$name" ]]; then
    note "bundle $name is already the current one"
  else
    [[ -z $current_target ]] || note "switching bundle: $current_target -> $name (roll back: ln -sfn $current_target $BUNDLES_DIR/current)"
    run ln -sfn "$name" "$bundles/current.new"
    run mv -T "$bundles/current.new" "$bundles/current"
  fi
}

install_config() {
  local src=${CONFIG:-$SRC_DIR/deploy/config.example.yaml}
  local conf_dir dst
  conf_dir=$(p "$CONF_DIR")
  dst="$conf_dir/config.yaml"
  if [[ ! -d $conf_dir ]]; then
    run install -d -m 0750 "$conf_dir"
  fi
  if [[ ! -d $conf_dir/tls ]]; then
    run install -d -m 0750 "$conf_dir/tls"
  fi
  if [[ -z $ROOT ]]; then
    run chown root:"$SERVICE_USER" "$conf_dir" "$conf_dir/tls"
  fi

  local written=""
  if [[ ! -e $dst ]]; then
    run install -m 0640 "$src" "$dst"
    written=$dst
    [[ -n $CONFIG ]] || FRESH_EXAMPLE_CONFIG=1
  elif cmp -s "$src" "$dst"; then
    note "$CONF_DIR/config.yaml is up to date"
  else
    run install -m 0640 "$src" "$dst.new"
    written=$dst.new
    note "kept the existing $CONF_DIR/config.yaml; the new one is $CONF_DIR/config.yaml.new (diff and merge by hand)"
  fi
  if [[ -z $ROOT && -n $written ]]; then
    run chown root:"$SERVICE_USER" "$written"
  fi
  if [[ $SKIP_PIP -eq 0 ]]; then
    local rdedge_bin
    rdedge_bin="$(p "$VENV")/bin/rdedge"
    if [[ $DRY_RUN -eq 0 ]] && ! "$rdedge_bin" check-config --help >/dev/null 2>&1; then
      die "this rdedge has no 'check-config' verb, which the unit runs before every start (ExecStartPre=)"
    fi
    run "$rdedge_bin" check-config "$dst" || die "$CONF_DIR/config.yaml does not validate (see above)"
  fi
  if [[ ! -e $(p "$CONF_DIR/mqtt-password") ]]; then
    NO_PASSWORD=1
  fi
}

render_unit() {
  # The unit in the repo names the default venv; --venv rewrites it.
  sed -e "s#$DEFAULT_VENV/#$VENV/#g" "$SRC_DIR/deploy/$UNIT_NAME"
}

install_unit() {
  local dst rendered
  dst=$(p "$UNIT_DIR/$UNIT_NAME")
  rendered="$WORK_DIR/$UNIT_NAME"
  render_unit >"$rendered"
  if [[ -f $dst ]] && cmp -s "$rendered" "$dst"; then
    note "$UNIT_DIR/$UNIT_NAME is up to date"
    return
  fi
  [[ -d $(p "$UNIT_DIR") ]] || run install -d -m 0755 "$(p "$UNIT_DIR")"
  run install -m 0644 "$rendered" "$dst"
}

start_service() {
  if [[ $USE_SYSTEMCTL -eq 0 ]]; then
    note "--no-systemctl: run 'systemctl daemon-reload && systemctl enable --now $UNIT_NAME' yourself"
    return
  fi
  if [[ -n $ROOT ]]; then
    # Offline: creates the multi-user.target.wants symlink inside the root, starts nothing.
    run systemctl --root="$ROOT" enable "$UNIT_NAME"
    return
  fi
  run systemctl daemon-reload
  if [[ ${FRESH_EXAMPLE_CONFIG:-0} -eq 1 || ${NO_PASSWORD:-0} -eq 1 ]]; then
    run systemctl enable "$UNIT_NAME"
    [[ ${FRESH_EXAMPLE_CONFIG:-0} -eq 0 ]] ||
      note "installed the EXAMPLE config: edit $CONF_DIR/config.yaml (broker, device_id, cameras) first"
    [[ ${NO_PASSWORD:-0} -eq 0 ]] ||
      note "no $CONF_DIR/mqtt-password: create it with: (umask 077; systemd-ask-password 'MQTT password:' >$CONF_DIR/mqtt-password)"
    note "then: systemctl start $UNIT_NAME && journalctl -u $UNIT_NAME -f"
  elif systemctl is-active --quiet "$UNIT_NAME"; then
    run systemctl enable "$UNIT_NAME"
    run systemctl restart "$UNIT_NAME"
  else
    run systemctl enable --now "$UNIT_NAME"
  fi
}

do_install() {
  note "installing rdedge: platform=$PLATFORM extra=[$(pip_extra)] venv=$VENV source=$SRC_DIR root=${ROOT:-/}"
  ensure_user
  ensure_venv
  install_bundle
  install_config
  install_unit
  start_service
  note "done"
}

# -------------------------------------------------------------------------------------------------- uninstall

do_uninstall() {
  local unit
  unit=$(p "$UNIT_DIR/$UNIT_NAME")
  note "removing rdedge (root=${ROOT:-/}; purge=$PURGE)"
  if [[ $USE_SYSTEMCTL -eq 1 ]]; then
    if [[ -n $ROOT ]]; then
      [[ ! -e $unit ]] || run systemctl --root="$ROOT" disable "$UNIT_NAME"
    elif [[ -e $unit ]]; then
      run systemctl disable --now "$UNIT_NAME"
    fi
  fi
  if [[ -e $unit ]]; then
    run rm -f "$unit"
  else
    note "$UNIT_DIR/$UNIT_NAME is not installed"
  fi
  if [[ $USE_SYSTEMCTL -eq 1 && -z $ROOT ]]; then
    run systemctl daemon-reload
    run systemctl reset-failed "$UNIT_NAME" || true
  fi
  if [[ -f $(p "$VENV")/pyvenv.cfg ]]; then
    run rm -rf "$(p "$VENV")"
  elif [[ -e $(p "$VENV") ]]; then
    note "warning: $VENV has no pyvenv.cfg, so it is not a venv this script made: not removing it"
  fi

  if [[ $PURGE -eq 0 ]]; then
    note "kept $CONF_DIR, $STATE_DIR (spool) and $BUNDLES_DIR; --purge removes them"
    return
  fi
  local d
  for d in "$UNIT_DIR/$UNIT_NAME.d" "$CONF_DIR" "$STATE_DIR" "$CACHE_DIR" /opt/rdedge; do
    if [[ -e $(p "$d") ]]; then
      run rm -rf "$(p "$d")"
    fi
  done
  if [[ -z $ROOT ]] && getent passwd "$SERVICE_USER" >/dev/null; then
    run userdel "$SERVICE_USER"
  fi
}

main() {
  parse_args "$@"
  detect_platform
  [[ $DRY_RUN -eq 0 ]] || note "dry run: printing every step, changing nothing"
  WORK_DIR=$(mktemp -d)
  trap 'rm -rf "$WORK_DIR"' EXIT
  if [[ $UNINSTALL -eq 1 ]]; then
    do_uninstall
  else
    do_install
  fi
}

main "$@"
