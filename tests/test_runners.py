"""The runner commands of docker/README.md, built into the real curate pipeline without contacting
any service: Dataflow through its dry run, Flink and Spark as portable Runner API protos, and the
local multi-process command run for real on the bundled sample."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PortableOptions,
    SparkRunnerOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from bm6b.cli import build_parser, main
from bm6b.pipelines.cli import config_from_args
from bm6b.pipelines.curate import build_pipeline, pipeline_options

README = Path(__file__).resolve().parent.parent / "docker" / "README.md"
ENVIRONMENT = {
    "PROJECT": "my-project",
    "REGION": "europe-west4",
    "BUCKET": "my-bucket",
    "IMAGE": "europe-west4-docker.pkg.dev/my-project/bm6b/bm6b-dataflow:0.1.0",
    "FLINK_MASTER": "flink-jobmanager.example.internal:8081",
    "SPARK_MASTER": "spark://spark-master.example.internal:7077",
}
CURATE_STEPS = ("Ingest", "Download", "Captions", "LanguageId", "DedupImage", "WriteShards", "WriteRejects")


def readme_commands() -> list[list[str]]:
    """Return every ``bm6b curate`` command of the README's bash blocks, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith("bm6b curate"):
                expanded = re.sub(r"\$(\w+)", lambda m: ENVIRONMENT[m.group(1)], line)
                commands.append(shlex.split(expanded)[1:])
    return commands


def command_for(runner: str, contains: str = "") -> list[str]:
    matches = [c for c in readme_commands() if runner_of(c) == runner and contains in " ".join(c)]
    assert len(matches) == 1, f"expected one {runner} command containing {contains!r} in {README}"
    return matches[0]


def runner_of(command: list[str]) -> str | None:
    return command[command.index("--runner") + 1] if "--runner" in command else None


def parse_command(command: list[str]):
    args, beam_args = build_parser().parse_known_args(command)
    assert args.command == "curate"
    return args, beam_args


def build(command: list[str], extra_beam_args: list[str] = ()):
    """Build the curate pipeline of a README command, as run_curate would, without running it."""
    args, beam_args = parse_command(command)
    config = config_from_args(args, args.inputs, args.output)
    options = pipeline_options(beam_args + list(extra_beam_args))
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    return pipeline, options, args


def top_level_steps(proto: beam_runner_api_pb2.Pipeline) -> set[str]:
    root = proto.components.transforms
    names = set()
    for transform_id in proto.root_transform_ids:
        names.add(root[transform_id].unique_name)
        names.update(root[sub].unique_name for sub in root[transform_id].subtransforms)
    return names


def test_readme_has_every_runner():
    runners = [runner_of(c) for c in readme_commands()]
    assert sorted(runners, key=str) == sorted(["DataflowRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", None],
                                              key=str)


# ---------------------------------------------------------------- Dataflow


@pytest.fixture(scope="module")
def dataflow_api():
    return pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient",
                               reason="DataflowRunner needs the gcp extra: pip install -e '.[gcp]'")


def dataflow_job(command: list[str]):
    pipeline, options, args = build(command, ["--dry_run=True"])
    result = pipeline.run()
    return result.job, options, args


def worker_environment(dataflow_api, job, options):
    """Build the job's Environment message (worker pool, image, service options) as the client does
    before it submits a job, minus the upload of the staged files."""
    environment = dataflow_api.Environment(
        packages=[],
        options=options,
        environment_version=dataflow_api._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url="gs://my-bucket/tmp/pipeline.pb",
        proto_pipeline=job.proto_pipeline,
    )
    return environment.proto


def test_dataflow_cpu_dry_run(dataflow_api):
    job, options, args = dataflow_job(command_for("DataflowRunner", "n2-standard-8"))

    assert args.min_image_size == 64  # from --recipe bm6b-default
    assert options.view_as(GoogleCloudOptions).project == "my-project"
    assert options.view_as(GoogleCloudOptions).region == "europe-west4"
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert set(CURATE_STEPS) <= top_level_steps(job.proto_pipeline)

    images = {env.payload for env in job.proto_pipeline.components.environments.values()}
    docker = [beam_runner_api_pb2.DockerPayload.FromString(p).container_image for p in images]
    assert docker == [ENVIRONMENT["IMAGE"]]

    environment = worker_environment(dataflow_api, job, options)
    pool = environment.worker_pools[0]
    assert pool.machine_type == "n2-standard-8"
    assert [c.container_image for c in pool.sdk_harness_container_images] == [ENVIRONMENT["IMAGE"]]
    assert options.view_as(WorkerOptions).max_num_workers == 50
    assert environment.temp_storage_prefix == "storage.googleapis.com/my-bucket/tmp"


def test_dataflow_gpu_dry_run(dataflow_api):
    job, options, args = dataflow_job(command_for("DataflowRunner", "nvidia-l4"))

    assert args.clip_device == "cuda"
    assert args.clip_model == "ViT-B-32"
    assert "ClipScore" in top_level_steps(job.proto_pipeline)

    environment = worker_environment(dataflow_api, job, options)
    assert environment.worker_pools[0].machine_type == "g2-standard-8"
    assert list(environment.service_options) == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]


# ---------------------------------------------------------------- Flink and Spark


def portable_proto(command: list[str]):
    from apache_beam.runners.portability.portable_runner import PortableRunner

    pipeline, options, args = build(command)
    return PortableRunner.get_proto_pipeline(pipeline, options), options


def assert_docker_environment(proto):
    environments = list(proto.components.environments.values())
    assert environments
    for environment in environments:
        assert environment.urn == common_urns.environments.DOCKER.urn
        payload = beam_runner_api_pb2.DockerPayload.FromString(environment.payload)
        assert payload.container_image == ENVIRONMENT["IMAGE"]


def test_flink_portable_proto():
    from apache_beam.runners.portability.flink_runner import FlinkRunner

    proto, options = portable_proto(command_for("FlinkRunner"))
    assert options.view_as(FlinkRunnerOptions).flink_master == ENVIRONMENT["FLINK_MASTER"]
    assert options.view_as(FlinkRunnerOptions).parallelism == 16
    assert options.view_as(PortableOptions).environment_type == "DOCKER"
    assert FlinkRunner.add_http_scheme(ENVIRONMENT["FLINK_MASTER"]) == "http://" + ENVIRONMENT["FLINK_MASTER"]
    assert set(CURATE_STEPS) <= top_level_steps(proto)
    assert_docker_environment(proto)


def test_spark_portable_proto():
    proto, options = portable_proto(command_for("SparkRunner"))
    assert options.view_as(SparkRunnerOptions).spark_master_url == ENVIRONMENT["SPARK_MASTER"]
    assert options.view_as(StandardOptions).runner == "SparkRunner"
    assert set(CURATE_STEPS) <= top_level_steps(proto)
    assert_docker_environment(proto)


def test_no_runner_means_in_process():
    """Without --runner, curate uses Beam's in-process runner."""
    _, beam_args = parse_command(["curate", "in.tsv", "-o", "out"])
    assert beam_args == []
    assert pipeline_options(beam_args).view_as(StandardOptions).runner == "FnApiRunner"


# ---------------------------------------------------------------- local, several processes


def test_local_multiprocess_on_sample(tmp_path):
    from bm6b.pipelines.demo import SampleServer, write_sample_manifest

    command = command_for(None)
    assert "multi_processing" in command
    manifest = tmp_path / "manifest.tsv"
    output = tmp_path / "out"
    placeholders = {"manifest.tsv": str(manifest), "out": str(output)}
    command = [placeholders.get(part, part) for part in command]

    with SampleServer() as server:
        rows = write_sample_manifest(manifest, server)
        assert main([*command, "--allow-network", "127.0.0.0/8"]) == 0

    stats = json.loads((output / "stats.json").read_text())
    assert stats["input_rows"] == rows
    assert stats["kept"] + stats["rejected"] == rows
    single = tmp_path / "single"
    with SampleServer() as server:
        write_sample_manifest(manifest, server)
        assert main(["curate", str(manifest), "-o", str(single), "--allow-network", "127.0.0.0/8"]) == 0
    reference = json.loads((single / "stats.json").read_text())
    assert stats["kept"] == reference["kept"]
    assert stats["rejects_by_reason"] == reference["rejects_by_reason"]
    assert (output / "report" / "index.html").is_file()
    assert os.path.getsize(output / "00000.tar") > 0


def test_local_runs_check_clip_models_here(tmp_path):
    from bm6b.pipelines.curate import runs_locally

    assert runs_locally(pipeline_options([]))
    assert runs_locally(pipeline_options(["--runner", "DirectRunner"]))
    assert not runs_locally(pipeline_options(["--runner", "DataflowRunner"]))
    assert not runs_locally(pipeline_options(["--runner", "FlinkRunner"]))

    manifest = tmp_path / "m.csv"
    manifest.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n", encoding="utf-8")
    command = ["curate", str(manifest), "-o", str(tmp_path / "out"), "--clip-model", "bm6b-tiny",
               "--clip-checkpoint", str(tmp_path / "missing.pt")]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build(command)
