"""The human preference page (`launch/annotate.py`): FastAPI and one Jinja2 template
(pages/annotate.html), no front-end build. Plain HTML forms: a verdict is a POST that appends
to human.jsonl (human.py) and redirects to the annotator's next prompt, so a reload or a restart
of the server resumes where the annotator stopped; a few lines of script add the keys.

Routes: GET / (name form and everyone's progress), GET /start?annotator=NAME (redirect),
GET /a/NAME (the next prompt, or the end), POST /a/NAME (item, choice), GET /health."""

import pathlib
import urllib.parse

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from lima_jax.evaluation.human import Annotation, check_name

TEMPLATES = Jinja2Templates(directory=str(pathlib.Path(__file__).with_name("pages")))


def create_app(annotation: Annotation) -> FastAPI:
    app = FastAPI(title="lima_jax annotation", docs_url=None, redoc_url=None, openapi_url=None)
    total = len(annotation.pairs)

    def page(request: Request, status: int = 200, **context) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "annotate.html", dict(context, total=total), status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "prompts": total, "verdicts": annotation.progress()}

    @app.get("/", response_class=HTMLResponse)
    async def start(request: Request):
        return page(request, page="start", progress=annotation.progress())

    @app.get("/start")
    async def begin(request: Request, annotator: str = ""):
        try:
            name = check_name(annotator.strip())
        except ValueError as e:
            return page(request, 400, page="start", progress=annotation.progress(), error=str(e))
        return RedirectResponse(f"/a/{urllib.parse.quote(name)}", status_code=303)

    @app.get("/a/{annotator}", response_class=HTMLResponse)
    async def prompt(request: Request, annotator: str):
        try:
            check_name(annotator)
        except ValueError as e:
            return page(request, 400, page="start", progress=annotation.progress(), error=str(e))
        item = annotation.next_item(annotator)
        if item is None:
            return page(request, page="done", annotator=annotator)
        return page(request, page="prompt", annotator=annotator, judged=len(annotation.verdicts.get(annotator, {})),
                    shown=annotation.shown(annotator, item))

    @app.post("/a/{annotator}")
    async def verdict(request: Request, annotator: str):
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8"))  # two fields: no multipart parser needed
        try:
            annotation.record(annotator, int(form["item"][0]), form["choice"][0])
        except (KeyError, ValueError) as e:
            return page(request, 400, page="start", progress=annotation.progress(), error=f"verdict refused: {e}")
        return RedirectResponse(f"/a/{urllib.parse.quote(annotator)}", status_code=303)

    return app

