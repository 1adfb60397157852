"""tabbi's settings in the `make hub` demo's service (c.TabbiExtension.*, c.LocalProvider.*, ...)."""

import os

c = get_config()  # noqa: F821
# People may name local repositories under their own demo home only.
c.TabbiExtension.local_repo_roots = [os.path.join(os.environ["TABBI_HUB_USERS_DIR"], "{username}")]
