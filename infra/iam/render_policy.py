#!/usr/bin/env python3
"""Prints the least-privilege IAM policy for canvasflow runs under one S3 output prefix, validated.

    python infra/iam/render_policy.py --bucket my-bucket --output-prefix canvasflow/runs \\
        --input-prefix inputs --model-prefix models/diffusiongemma-26B-A4B-it > policy.json

What canvasflow does on S3, and so what the policy allows:
- output prefix: list it, read, write and delete objects under it (parts, manifests, stats, _SUCCESS, the
  nightly pointers LATEST and LATEST-<run_prefix> and locks, retention of old runs, the start-up write probe);
- input and model prefixes: list them and read objects under them, nothing else;
- s3:ListBucket only with an s3:prefix condition naming those prefixes. It also makes S3 answer 404, not 403,
  for a missing key under them (S3 decides that with s3:ListBucket), which canvasflow relies on to tell "not
  written yet" from "forbidden".
A prefix given as s3://other-bucket/prefix may live in another bucket. Options add statements for an SSE-KMS
bucket key (--kms-key-arn) and, for the Ray head node's role of infra/ray/cluster-aws.yaml, the EC2 calls of
the Ray autoscaler (--ray-autoscaler-worker-role-arn). `--template` prints infra/iam/output-prefix-policy.json,
the same policy with <YOUR_...> placeholders (not validated).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
from dataclasses import dataclass

PARTITIONS = ("aws", "aws-cn", "aws-us-gov")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
ROLE_ARN_RE = re.compile(r"^arn:(aws|aws-cn|aws-us-gov):iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
KMS_ARN_RE = re.compile(r"^arn:(aws|aws-cn|aws-us-gov):kms:[a-z0-9-]+:\d{12}:key/[0-9a-f-]{36}$")
CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/=+@ -]{1,255}$")
DLAMI_PARAMETERS = "parameter/aws/service/deeplearning/*"
TEMPLATE_VALUES = {
    "bucket": "<YOUR_BUCKET>",
    "output_prefix": "<YOUR_OUTPUT_PREFIX>",
    "input_prefixes": ["<YOUR_INPUT_PREFIX>"],
    "model_prefixes": ["<YOUR_MODEL_PREFIX>"],
}


class PolicyError(ValueError):
    """An argument cannot make a valid policy; the message names it."""


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # no leading or trailing '/'


def check_bucket(bucket: str, what: str) -> str:
    if not BUCKET_RE.match(bucket) or ".." in bucket or ".-" in bucket or "-." in bucket:
        raise PolicyError(
            f"{what}: {bucket!r} is not an S3 bucket name (3-63 characters: lowercase letters, digits, '.', '-')"
        )
    try:
        ipaddress.ip_address(bucket)
    except ValueError:
        return bucket
    raise PolicyError(f"{what}: {bucket!r} is an IP address, not a bucket name")


def check_prefix(prefix: str, what: str, *, allow_empty: bool = False) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        if allow_empty:
            return prefix
        raise PolicyError(f"{what}: give a prefix (the policy is for one prefix, not the whole bucket)")
    if any(c in prefix for c in "*?$\\\"'") or any(ord(c) < 32 for c in prefix):
        raise PolicyError(f"{what}: {prefix!r} contains a wildcard, quote or control character")
    if any(part in ("", ".", "..") for part in prefix.split("/")):
        raise PolicyError(f"{what}: {prefix!r} has an empty, '.' or '..' segment")
    return prefix


def location(value: str, default_bucket: str, what: str, *, validate: bool) -> Location:
    """`prefix` (in the default bucket) or `s3://bucket/prefix`."""
    if value.startswith("s3://"):
        bucket, _, prefix = value[len("s3://") :].partition("/")
    else:
        bucket, prefix = default_bucket, value
    if validate:
        return Location(check_bucket(bucket, what), check_prefix(prefix, what))
    return Location(bucket, prefix.strip("/"))


def build_policy(
    bucket: str,
    output_prefix: str,
    input_prefixes: list[str] | tuple[str, ...] = (),
    model_prefixes: list[str] | tuple[str, ...] = (),
    *,
    partition: str = "aws",
    kms_key_arns: list[str] | tuple[str, ...] = (),
    ray_autoscaler_worker_role_arn: str | None = None,
    ray_cluster_name: str = "canvasflow",
    validate: bool = True,
) -> dict:
    """The policy document (a dict); raises PolicyError naming the bad argument when `validate`."""
    if partition not in PARTITIONS:
        raise PolicyError(f"--partition: {partition!r} is not one of {', '.join(PARTITIONS)}")
    if validate:
        check_bucket(bucket, "--bucket")
    output = location(output_prefix, bucket, "--output-prefix", validate=validate)
    inputs = [location(p, bucket, "--input-prefix", validate=validate) for p in input_prefixes]
    models = [location(p, bucket, "--model-prefix", validate=validate) for p in model_prefixes]
    s3 = f"arn:{partition}:s3:::"

    listed: dict[str, list[str]] = {}
    for loc in [output, *inputs, *models]:
        for value in (loc.prefix, f"{loc.prefix}/*"):  # a listing of the prefix itself, and below it
            if value not in listed.setdefault(loc.bucket, []):
                listed[loc.bucket].append(value)
    statements: list[dict] = []
    for i, (name, prefixes) in enumerate(listed.items()):
        statements.append(
            {
                "Sid": "ListRunPrefixes" + (str(i + 1) if len(listed) > 1 else ""),
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"{s3}{name}",
                "Condition": {"StringLike": {"s3:prefix": prefixes}},
            }
        )
    statements.append(
        {
            "Sid": "ReadWriteOutputPrefix",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            "Resource": f"{s3}{output.bucket}/{output.prefix}/*",
        }
    )
    if inputs:
        # The prefix itself too: data.path may name a single object (s3://bucket/inputs/prompts.jsonl).
        resources = []
        for loc in inputs:
            resources += [f"{s3}{loc.bucket}/{loc.prefix}", f"{s3}{loc.bucket}/{loc.prefix}/*"]
        statements.append(
            {"Sid": "ReadInputPrefix", "Effect": "Allow", "Action": "s3:GetObject", "Resource": resources}
        )
    if models:
        statements.append(
            {
                "Sid": "ReadModelPrefix",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": [f"{s3}{loc.bucket}/{loc.prefix}/*" for loc in models],
            }
        )
    if kms_key_arns:
        for arn in kms_key_arns:
            if validate and not KMS_ARN_RE.match(arn):
                raise PolicyError(
                    f"--kms-key-arn: {arn!r} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"
                )
        statements.append(
            {
                "Sid": "UseBucketKmsKey",
                "Effect": "Allow",
                "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                "Resource": list(kms_key_arns),
            }
        )
    if ray_autoscaler_worker_role_arn is not None:
        statements += autoscaler_statements(
            ray_autoscaler_worker_role_arn, ray_cluster_name, partition=partition, validate=validate
        )
    policy = {"Version": "2012-10-17", "Statement": statements}
    if validate:
        check_policy(policy)
    return policy


def autoscaler_statements(
    worker_role_arn: str, cluster_name: str, *, partition: str, validate: bool
) -> list[dict]:
    """What the Ray autoscaler on the head node calls to launch and remove the cluster's workers.

    Ray tags every node it launches with ray-cluster-name=<cluster_name> in the launch request; changes to
    existing instances are limited to those tags. Launching with the workers' instance profile needs
    iam:PassRole on their role, and the AMI given as resolve:ssm:... needs ssm:GetParameters on AWS's public
    Deep Learning AMI parameters.
    """
    if validate and not ROLE_ARN_RE.match(worker_role_arn):
        raise PolicyError(
            f"--ray-autoscaler-worker-role-arn: {worker_role_arn!r} is not an IAM role ARN "
            "(arn:aws:iam::ACCOUNT:role/NAME; the role of the workers' instance profile)"
        )
    if validate and not CLUSTER_NAME_RE.match(cluster_name):
        raise PolicyError(f"--ray-cluster-name: {cluster_name!r} is not a valid EC2 tag value")
    return [
        {
            "Sid": "RayAutoscalerDescribe",
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceTypes"],
            "Resource": "*",
        },
        {"Sid": "RayAutoscalerLaunch", "Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*"},
        {
            "Sid": "RayAutoscalerTagAtLaunch",
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": "*",
            "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
        },
        {
            "Sid": "RayAutoscalerManageClusterNodes",
            "Effect": "Allow",
            "Action": ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"],
            "Resource": f"arn:{partition}:ec2:*:*:instance/*",
            "Condition": {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": cluster_name}},
        },
        {
            "Sid": "RayAutoscalerPassWorkerRole",
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": worker_role_arn,
        },
        {
            "Sid": "RayAutoscalerResolveAmi",
            "Effect": "Allow",
            "Action": "ssm:GetParameters",
            "Resource": f"arn:{partition}:ssm:*::{DLAMI_PARAMETERS}",
        },
    ]


S3_WRITE_ACTIONS = {
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:PutObjectAcl",
    "s3:DeleteBucket",
    "s3:PutBucketPolicy",
}


def check_policy(policy: dict) -> None:
    """Structural checks every rendered policy passes (raises PolicyError)."""
    if policy.get("Version") != "2012-10-17":
        raise PolicyError("policy Version must be 2012-10-17")
    statements = policy.get("Statement")
    if not isinstance(statements, list) or not statements:
        raise PolicyError("policy has no statements")
    sids = [s.get("Sid") for s in statements]
    if len(set(sids)) != len(sids):
        raise PolicyError(f"duplicate Sid in {sids}")
    for statement in statements:
        if statement.get("Effect") != "Allow":
            raise PolicyError(f"{statement.get('Sid')}: Effect must be Allow")
        actions = as_list(statement.get("Action"))
        resources = as_list(statement.get("Resource"))
        if not actions or not resources:
            raise PolicyError(f"{statement.get('Sid')}: Action and Resource are required")
        for action in actions:
            if action == "*" or action.endswith(":*"):
                raise PolicyError(f"{statement.get('Sid')}: wildcard action {action!r}")
        if any(a.startswith("s3:") for a in actions) and "*" in resources:
            raise PolicyError(f"{statement.get('Sid')}: S3 actions on Resource '*'")
        for action in actions:
            if action in S3_WRITE_ACTIONS:
                for resource in resources:
                    if not re.match(r"^arn:[\w-]+:s3:::[^/*]+/[^*]+/\*$", resource):
                        raise PolicyError(
                            f"{statement.get('Sid')}: {action} must be limited to objects under a prefix, "
                            f"not {resource!r}"
                        )
        if "s3:ListBucket" in actions:
            prefixes = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
            if not prefixes or any(p in ("", "*", "/*") for p in as_list(prefixes)):
                raise PolicyError(f"{statement.get('Sid')}: s3:ListBucket needs an s3:prefix condition")


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def template() -> dict:
    return build_policy(**TEMPLATE_VALUES, validate=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the least-privilege IAM policy for canvasflow runs under one S3 output prefix.",
        epilog="A prefix may be given as s3://bucket/prefix to name another bucket than --bucket.",
    )
    parser.add_argument("--template", action="store_true", help="print the <YOUR_...> template and exit")
    parser.add_argument("--bucket", help="bucket of the output prefix (and of the other prefixes by default)")
    parser.add_argument("--output-prefix", help="output.uri is s3://BUCKET/OUTPUT_PREFIX")
    parser.add_argument(
        "--input-prefix", action="append", default=[], help="data.path prefix or object; repeatable"
    )
    parser.add_argument("--model-prefix", action="append", default=[], help="model.path prefix; repeatable")
    parser.add_argument("--partition", default="aws", choices=PARTITIONS)
    parser.add_argument(
        "--kms-key-arn", action="append", default=[], help="SSE-KMS key of a bucket; repeatable"
    )
    parser.add_argument(
        "--ray-autoscaler-worker-role-arn",
        help="add the Ray autoscaler's EC2 statements (the head node's role in infra/ray/cluster-aws.yaml); "
        "the value is the workers' role, which the head passes to the instances it launches",
    )
    parser.add_argument(
        "--ray-cluster-name", default="canvasflow", help="cluster_name of the launcher config"
    )
    args = parser.parse_args(argv)
    if args.template:
        policy = template()
    else:
        if not args.bucket or not args.output_prefix:
            parser.error("--bucket and --output-prefix are required (or --template)")
        try:
            policy = build_policy(
                args.bucket,
                args.output_prefix,
                args.input_prefix,
                args.model_prefix,
                partition=args.partition,
                kms_key_arns=args.kms_key_arn,
                ray_autoscaler_worker_role_arn=args.ray_autoscaler_worker_role_arn,
                ray_cluster_name=args.ray_cluster_name,
            )
        except PolicyError as e:
            print(f"render_policy: {e}", file=sys.stderr)
            return 2
    print(json.dumps(policy, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
