#!/usr/bin/env python3
"""Applies the documents `putonly policy --json` printed, as they are, to a
moto server seeded by seed_scenario.py (with the admin identity): a new
bucket with the bucket policy and the lifecycle rule, a new role with the
trust policy and the inline role policy. The seed's user ``bobbytables`` is
also allowed (by its own IAM policy, account A's business) to assume the new
role, since the generated trust policy may delegate that to account A.

Usage: apply_policies.py ENDPOINT_URL SCENARIO_DIR DOCUMENTS_JSON BUCKET ROLE_NAME
"""
import json
import sys

import boto3


def main(endpoint, scenario_dir, documents, bucket, role):
    scenario = json.load(open(f"{scenario_dir}/scenario.json"))
    docs = json.load(open(documents))
    kw = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=scenario["admin"]["access_key_id"],
        aws_secret_access_key=scenario["admin"]["secret_access_key"],
    )
    s3 = boto3.client("s3", **kw)
    iam = boto3.client("iam", **kw)
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(docs["bucket_policy"]))
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration=docs["lifecycle_rule"]
    )
    arn = iam.create_role(
        RoleName=role, AssumeRolePolicyDocument=json.dumps(docs["trust_policy"])
    )["Role"]["Arn"]
    iam.put_role_policy(
        RoleName=role, PolicyName="putonly-write", PolicyDocument=json.dumps(docs["role_policy"])
    )
    iam.put_user_policy(
        UserName="bobbytables",
        PolicyName=f"assume-{role}",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": arn}],
            }
        ),
    )
    print(arn)


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
