"""`loraforge webui`: the whole workflow in a browser, through the CLI's own code paths.

The app writes a config YAML and runs `loraforge train CONFIG` as a child process, so a run started here is an
ordinary run dir (the CLI can resume it, and the UI shows runs the CLI started). Pieces: `workspace` (which files
the UI may touch), `form` (the config form generated from the schema), `checks` (validate, preflight, estimate and
the token view), `runs` (child processes: train, eval, merge), `chat` (side-by-side answers), `security` (token and
Host checks), `routes` (the HTTP API), `pages` (the HTML) and `app` (assembly). Imported only by `loraforge webui`.
"""
