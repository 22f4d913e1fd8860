#!/usr/bin/env python3
"""Creates the seed's cross-account scenario in a running moto server, then
switches IAM authorization on.

The scenario is the one in cross-account-s3-bucket-access.md, with moto's
account id (123456789012) instead of the made-up 8675309:

  * bucket ``account-b-bucket`` (account B);
  * user ``bobbytables`` with an access key, allowed to assume the role;
  * role ``account-a-s3-role`` whose trust policy names the user and whose
    inline policy allows s3:PutObject and s3:PutObjectAcl on foo/* and
    fighters/* only;
  * user ``admin`` with every permission, to read objects back in tests.

Writes into OUT_DIR: ``credentials`` and ``config`` (AWS shared files with
the profiles ``s3-test`` and ``admin``), ``agent.toml`` (a putonly
configuration for this endpoint) and ``scenario.json``.

Usage: seed_scenario.py ENDPOINT_URL OUT_DIR
"""
import json
import os
import sys
import urllib.request

import boto3

ACCOUNT = "123456789012"
BUCKET = "account-b-bucket"
USER = "bobbytables"
ROLE = "account-a-s3-role"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE}"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:user/{USER}"

# The seed's documents, as the article gives them (account id replaced).
TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "",
            "Effect": "Allow",
            "Principal": {"Service": "s3.amazonaws.com", "AWS": USER_ARN},
            "Action": "sts:AssumeRole",
        }
    ],
}
ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:PutObject", "s3:PutObjectAcl"],
            "Resource": [
                f"arn:aws:s3:::{BUCKET}/foo/*",
                f"arn:aws:s3:::{BUCKET}/fighters/*",
            ],
        }
    ],
}
USER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": ROLE_ARN}],
}
ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def main(endpoint: str, out_dir: str) -> None:
    kw = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    s3 = boto3.client("s3", **kw)
    iam = boto3.client("iam", **kw)

    s3.create_bucket(Bucket=BUCKET)
    iam.create_user(UserName=USER)
    user_key = iam.create_access_key(UserName=USER)["AccessKey"]
    iam.put_user_policy(
        UserName=USER, PolicyName="assume-upload-role", PolicyDocument=json.dumps(USER_POLICY)
    )
    iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(TRUST_POLICY))
    iam.put_role_policy(
        RoleName=ROLE, PolicyName="account-b-bucket-upload", PolicyDocument=json.dumps(ROLE_POLICY)
    )
    iam.create_user(UserName="admin")
    admin_key = iam.create_access_key(UserName="admin")["AccessKey"]
    iam.put_user_policy(
        UserName="admin", PolicyName="everything", PolicyDocument=json.dumps(ADMIN_POLICY)
    )

    # From here on moto checks every request's signature and policies.
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(req).read()

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "credentials"), "w") as f:
        f.write(
            f"[s3-test]\naws_access_key_id = {user_key['AccessKeyId']}\n"
            f"aws_secret_access_key = {user_key['SecretAccessKey']}\n\n"
            f"[admin]\naws_access_key_id = {admin_key['AccessKeyId']}\n"
            f"aws_secret_access_key = {admin_key['SecretAccessKey']}\n"
        )
    with open(os.path.join(out_dir, "config"), "w") as f:
        f.write("[profile s3-test]\nregion = us-east-1\n\n[profile admin]\nregion = us-east-1\n")
    with open(os.path.join(out_dir, "agent.toml"), "w") as f:
        f.write(
            f'[aws]\nregion = "us-east-1"\nprofile = "s3-test"\nendpoint_url = "{endpoint}"\n\n'
            f'[role]\narn = "{ROLE_ARN}"\n\n'
            f'[bucket]\nname = "{BUCKET}"\nallowed_prefixes = ["foo/", "fighters/"]\n'
        )
    os.chmod(os.path.join(out_dir, "credentials"), 0o600)
    with open(os.path.join(out_dir, "scenario.json"), "w") as f:
        json.dump(
            {
                "endpoint": endpoint,
                "bucket": BUCKET,
                "role_arn": ROLE_ARN,
                "user": {"access_key_id": user_key["AccessKeyId"], "secret_access_key": user_key["SecretAccessKey"]},
                "admin": {"access_key_id": admin_key["AccessKeyId"], "secret_access_key": admin_key["SecretAccessKey"]},
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
