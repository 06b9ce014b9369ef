# Renders each GGUF's chat template with jinja2 the way transformers does, for
# conversations with tools, tool calls and tool results; prints the JSON of
# tests/vectors/chat_template_tools.json. Usage: render_tools.py FILE.gguf...
# (the Qwen2.5-Coder 0.5B and 1.5B templates differ: one writes the call format
# with doubled braces).
import json, struct, sys
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

def gguf_template(path):
    f = open(path, 'rb')
    def r(fmt): return struct.unpack('<' + fmt, f.read(struct.calcsize('<' + fmt)))
    r('II'); nt, nkv = r('QQ')
    def rs():
        (n,) = r('Q'); return f.read(n).decode()
    def rv(t):
        if t == 8: return rs()
        if t == 9:
            at, n = r('IQ'); return [rv(at) for _ in range(n)]
        return r({0:'B',1:'b',2:'H',3:'h',4:'I',5:'i',6:'f',7:'?',10:'Q',11:'q',12:'d'}[t])[0]
    for _ in range(nkv):
        k = rs(); (t,) = r('I'); v = rv(t)
        if k == 'tokenizer.chat_template': return v

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.filters['tojson'] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city (°C)",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}}
read = {"type": "function", "function": {"name": "read_file", "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
cases = [
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [weather]},
    {"messages": [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "Open src/main.rs"}], "tools": [weather, read]},
    {"messages": [{"role": "user", "content": "Weather in Paris and Oslo?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                                                                       {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                  {"role": "tool", "content": "{\"temp_c\": 18}"}, {"role": "tool", "content": "{\"temp_c\": 4}"}], "tools": [weather]},
    {"messages": [{"role": "user", "content": "Read it"},
                  {"role": "assistant", "content": "Reading now.", "tool_calls": [{"function": {"name": "read_file", "arguments": {"path": "a.rs"}}}]},
                  {"role": "tool", "content": "fn main() {}"}, {"role": "assistant", "content": "It is empty."}, {"role": "user", "content": "Thanks"}], "tools": [read]},
]
import os
prompts = {}
for path in sys.argv[1:]:
    tmpl = env.from_string(gguf_template(path))
    prompts[os.path.basename(path)] = [
        tmpl.render(messages=c["messages"], tools=c["tools"], add_generation_prompt=True) for c in cases]
json.dump({"source": "jinja2 " + jinja2.__version__ + " rendering each GGUF's tokenizer.chat_template as transformers does (trim_blocks, lstrip_blocks, tojson = json.dumps(ensure_ascii=False)), by scripts/vectors/render_tools.py",
           "cases": cases, "prompts": prompts}, sys.stdout, indent=1, ensure_ascii=False)
