"""The server's endpoints, one APIRouter per area: `models` (health, model list), `completions` (chat and text
completions, JSON or SSE) and `admin` (load / replace / unload adapters). Each reads the shared state through
the `State` dependency (`loraforge.serve.state`)."""
