"""An MLflow tracking server over HTTP: reachable, credentials accepted, permissions enough, before any worker.

MLflow's client retries for minutes and reports a 403 from deep inside whichever call hits it
first; here each problem is found with one short request in the driver and named: the
variable to set, or the user, the permission and the resource missing. Servers without the
basic-auth app (no `/users/current`) skip the user checks.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from pipeline.config import ConfigError

USER_VARS = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
PROBE_TAG = "loraforge.access_checked"
MODEL_DESCRIPTION = "LoRA adapters found by loraforge sweeps"


def _request(url: str, timeout: float = 5) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    user, password, token = (os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                                         "MLFLOW_TRACKING_TOKEN"))
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (user-given URI)
            return response.status, response.read(1 << 16)
    except urllib.error.HTTPError as err:
        return err.code, err.read(1 << 12)


def check_reachable(tracking_uri: str) -> None:
    try:
        _request(tracking_uri.rstrip("/") + "/health")
    except (urllib.error.URLError, OSError) as err:
        raise ConfigError([
            f"tracking.tracking_uri: MLflow tracking URI unreachable: {tracking_uri} ({getattr(err, 'reason', err)}); "
            "start the server or fix the URI (MLFLOW_TRACKING_URI overrides the config)"
        ]) from None


def current_user(tracking_uri: str) -> str | None:
    """The user the server sees (None: the server has no auth app); ConfigError when the credentials fail."""
    status, body = _request(tracking_uri.rstrip("/") + "/api/2.0/mlflow/users/current")
    if status == 404:
        return None
    if status == 401:
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if not who and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
            raise ConfigError([f"tracking.tracking_uri: {tracking_uri} needs credentials; set {USER_VARS} "
                               "(or MLFLOW_TRACKING_TOKEN)"])
        raise ConfigError([f"tracking.tracking_uri: {tracking_uri} rejected the credentials of user {who!r}; "
                           f"fix {USER_VARS}" if who else
                           f"tracking.tracking_uri: {tracking_uri} rejected MLFLOW_TRACKING_TOKEN; fix it"])
    if status != 200:
        raise ConfigError([f"tracking.tracking_uri: {tracking_uri} answered {status} to /users/current: "
                           f"{body[:200].decode(errors='replace')}"])
    return json.loads(body)["user"]["username"]


def _denied(err: Exception) -> bool:
    return "PERMISSION_DENIED" in str(getattr(err, "error_code", "")) or " 403 " in str(err)


def check_permissions(mlflow_client: Any, user: str, experiment_name: str, model_name: str | None) -> list[str]:
    """What `user` may not do that a sweep needs: write to the experiment and to the registered model.

    Probed with one harmless write each (a tag), so the server's own rules, its default
    permission included, decide; a missing experiment or model is created later, which the
    creator may always do.
    """
    problems = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        experiment = mlflow_client.get_experiment_by_name(experiment_name)
    except Exception as err:
        if not _denied(err):
            raise
        return [f"tracking.experiment_name: user {user!r} has no READ permission on experiment {experiment_name!r}; "
                "an admin must grant it EDIT (or pick another experiment name)"]
    if experiment is not None:
        try:
            mlflow_client.set_experiment_tag(experiment.experiment_id, PROBE_TAG, f"{user} {stamp}")
        except Exception as err:
            if not _denied(err):
                raise
            problems.append(f"tracking.experiment_name: user {user!r} lacks EDIT permission on experiment "
                            f"{experiment_name!r} (id {experiment.experiment_id}); an admin must grant it "
                            "(MLflow auth: experiments/permissions/create)")
    if model_name:
        try:
            model = mlflow_client.get_registered_model(model_name)
        except Exception as err:
            if not _denied(err) and "RESOURCE_DOES_NOT_EXIST" not in str(getattr(err, "error_code", "")):
                raise
            # auth answers 403 for a model that does not exist too: creating it tells the two apart
            # (the sweep would create it at registration anyway; its creator may manage it)
            try:
                mlflow_client.create_registered_model(model_name, description=MODEL_DESCRIPTION)
                return problems
            except Exception as create_err:
                if not (_denied(create_err) or "RESOURCE_ALREADY_EXISTS" in str(getattr(create_err, "error_code", ""))):
                    raise
                return problems + [f"tracking.registered_model_name: user {user!r} has no READ permission on "
                                   f"registered model {model_name!r}; an admin must grant it EDIT (or pick another name)"]
        if model is not None:
            try:
                mlflow_client.set_registered_model_tag(model_name, PROBE_TAG, f"{user} {stamp}")
            except Exception as err:
                if not _denied(err):
                    raise
                problems.append(f"tracking.registered_model_name: user {user!r} lacks EDIT permission on "
                                f"registered model {model_name!r}; an admin must grant it (MLflow auth: "
                                "registered-models/permissions/create)")
    return problems
