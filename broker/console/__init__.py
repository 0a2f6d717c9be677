"""The web console (``/console``): the access-key pages operators know, server-rendered
on the daemon's HTTP listener, on the same keystore calls as the API (docs/console.md).

* ``web``: the ``Console`` (templates, sessions, guard, scopes) and its route table;
* ``sessions``: server-side sign-in sessions with CSRF tokens and one-time secret reveals;
* ``forms``: the key form read field by field, and the one-line restriction summaries;
* ``pages``: the handlers, by page.
"""
