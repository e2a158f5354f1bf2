"""The assembler against SSE streams captured from the real llama-server (xllamacpp + Gemma 3
270M, temperature 0, seed 1), each with llama.cpp's own non-streamed answer to the same
request. Trimmed: ``generation_settings`` keeps five keys, and OpenAI chunks other than
the last ones lose ``created``/``id``/``model``/``system_fingerprint``/``object``. In each
answer the figures that differ from call to call (``timings``, ``created``, ``id``,
``usage.prompt_tokens_details.cached_tokens``, tool-call ids) are the stream's."""

from __future__ import annotations

import json
import random

import pytest

from app.assemble import (
    ROUTES,
    Assembler,
    IncompleteStream,
    applies,
    dumps,
    refusal,
    upstream_payload,
)

# --- captured from the real server ---

# POST /completion {"prompt": "The sky is", "n_predict": 3, "n_probs": 1}
NATIVE_SSE = (
    b'data: {"index":0,"content":" the","tokens":[506],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":4,"completion_probabilities":[{"id":506,'
    b'"token":" the","bytes":[32,116,104,101],"logprob":-0.9322661757469177,'
    b'"top_logprobs":[{"id":506,"token":" the","bytes":[32,116,104,101],'
    b'"logprob":-0.9322661757469177}]}]}\n\n'
    b'data: {"index":0,"content":" limit","tokens":[4576],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":2,"tokens_evaluated":4,"completion_probabilities":[{"id":4576,'
    b'"token":" limit","bytes":[32,108,105,109,105,116],"logprob":-0.006418097298592329,'
    b'"top_logprobs":[{"id":4576,"token":" limit","bytes":[32,108,105,109,105,116],'
    b'"logprob":-0.006418097298592329}]}]}\n\n'
    b'data: {"index":0,"content":" for","tokens":[573],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":3,"tokens_evaluated":4,"completion_probabilities":[{"id":573,'
    b'"token":" for","bytes":[32,102,111,114],"logprob":-0.7399994730949402,'
    b'"top_logprobs":[{"id":573,"token":" for","bytes":[32,102,111,114],'
    b'"logprob":-0.7399994730949402}]}]}\n\n'
    b'data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"gemma",'
    b'"tokens_predicted":3,"tokens_evaluated":4,"generation_settings":{"seed":1,"temperature":0.0,'
    b'"n_predict":3,"stream":true,"n_probs":1},"prompt":"<bos>The sky is","has_new_line":false,'
    b'"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":6,'
    b'"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":54.485,"prompt_per_token_ms":13.62125,'
    b'"prompt_per_second":73.41470129393412,"predicted_n":3,"predicted_ms":94.053,'
    b'"predicted_per_token_ms":47.0265,"predicted_per_second":21.264606126333025}}\n\n'
)
NATIVE_ANSWER = (
    b'{"index":0,"content":" the limit for","tokens":[],"id_slot":0,"stop":true,"model":"gemma",'
    b'"tokens_predicted":3,"tokens_evaluated":4,"generation_settings":{"seed":1,"temperature":0.0,'
    b'"n_predict":3,"stream":false,"n_probs":1},"prompt":"<bos>The sky is","has_new_line":false,'
    b'"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":6,'
    b'"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":54.485,"prompt_per_token_ms":13.62125,'
    b'"prompt_per_second":73.41470129393412,"predicted_n":3,"predicted_ms":94.053,'
    b'"predicted_per_token_ms":47.0265,"predicted_per_second":21.264606126333025},'
    b'"completion_probabilities":[{"id":506,"token":" the","bytes":[32,116,104,101],'
    b'"logprob":-0.9322661757469177,"top_logprobs":[{"id":506,"token":" the","bytes":[32,116,104,'
    b'101],"logprob":-0.9322661757469177}]},{"id":4576,"token":" limit","bytes":[32,108,105,109,'
    b'105,116],"logprob":-0.006418097298592329,"top_logprobs":[{"id":4576,"token":" limit",'
    b'"bytes":[32,108,105,109,105,116],"logprob":-0.006418097298592329}]},{"id":573,"token":" for",'
    b'"bytes":[32,102,111,114],"logprob":-0.7399994730949402,"top_logprobs":[{"id":573,'
    b'"token":" for","bytes":[32,102,111,114],"logprob":-0.7399994730949402}]}]}'
)

# POST /completion {"prompt": "Glyph:", "n_predict": 4,
#                   "grammar": 'root ::= "ab\U00013000\U00013000"'}
# The grammar forces U+13000 as 4 byte tokens; generation stops after 2 of them.
NATIVE_TAIL_SSE = (
    b'data: {"index":0,"content":"a","tokens":[236746],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":4}\n\n'
    b'data: {"index":0,"content":"b","tokens":[236763],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":2,"tokens_evaluated":4}\n\n'
    b'data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"gemma",'
    b'"tokens_predicted":4,"tokens_evaluated":4,"generation_settings":{"seed":1,"temperature":0.0,'
    b'"n_predict":4,"stream":true,"n_probs":0},"prompt":"<bos>Glyph:","has_new_line":false,'
    b'"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":7,'
    b'"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":77.634,"prompt_per_token_ms":19.4085,'
    b'"prompt_per_second":51.523816884354794,"predicted_n":4,"predicted_ms":205.841,'
    b'"predicted_per_token_ms":68.61366666666667,"predicted_per_second":14.574355934920643}}\n\n'
)
NATIVE_TAIL_ANSWER = (
    b'{"index":0,"content":"ab\xef\xbf\xbd","tokens":[],"id_slot":0,"stop":true,"model":"gemma",'
    b'"tokens_predicted":4,"tokens_evaluated":4,"generation_settings":{"seed":1,"temperature":0.0,'
    b'"n_predict":4,"stream":false,"n_probs":0},"prompt":"<bos>Glyph:","has_new_line":false,'
    b'"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":7,'
    b'"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":77.634,"prompt_per_token_ms":19.4085,'
    b'"prompt_per_second":51.523816884354794,"predicted_n":4,"predicted_ms":205.841,'
    b'"predicted_per_token_ms":68.61366666666667,"predicted_per_second":14.574355934920643}}'
)

# POST /completion {"prompt": "Answer:", "n_predict": 6, "ignore_eos": true,
#                   "grammar": 'root ::= "yes"'}: fails after "yes" (real llama.cpp error)
NATIVE_ERROR_SSE = (
    b'data: {"index":0,"content":"yes","tokens":[4443],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":3}\n\n'
    b'data: {"error":{"code":500,'
    b'"message":"got exception: Unexpected empty grammar stack after accepting piece: <unused32> ('
    b'38)","type":"server_error"}}\n\n'
)
NATIVE_ERROR_ANSWER = (
    b'{"error":{"code":500,'
    b'"message":"got exception: Unexpected empty grammar stack after accepting piece: <unused32> ('
    b'38)","type":"server_error"}}'
)

# POST /v1/completions {"prompt": "The sky is", "max_tokens": 3, "logprobs": 1}, streamed
# with upstream_payload (include_usage, timings_per_token)
COMPLETIONS_SSE = (
    b'data: {"choices":[{"text":" the","index":0,"logprobs":{"content":[{"id":506,"token":" the",'
    b'"bytes":[32,116,104,101],"logprob":-0.9322661757469177,"top_logprobs":[{"id":506,'
    b'"token":" the","bytes":[32,116,104,101],"logprob":-0.9322661757469177}]}]},'
    b'"finish_reason":null}],"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":68.484,'
    b'"prompt_per_token_ms":17.121,"prompt_per_second":58.40780328251855,"predicted_n":1,'
    b'"predicted_ms":0.001,"predicted_per_token_ms":0.0,"predicted_per_second":0.0}}\n\n'
    b'data: {"choices":[{"text":" limit","index":0,"logprobs":{"content":[{"id":4576,'
    b'"token":" limit","bytes":[32,108,105,109,105,116],"logprob":-0.006418097298592329,'
    b'"top_logprobs":[{"id":4576,"token":" limit","bytes":[32,108,105,109,105,116],'
    b'"logprob":-0.006418097298592329}]}]},"finish_reason":null}],"timings":{"cache_n":0,'
    b'"prompt_n":4,"prompt_ms":68.484,"prompt_per_token_ms":17.121,'
    b'"prompt_per_second":58.40780328251855,"predicted_n":2,"predicted_ms":47.17,'
    b'"predicted_per_token_ms":47.17,"predicted_per_second":21.1999152003392}}\n\n'
    b'data: {"choices":[{"text":" for","index":0,"logprobs":{"content":[{"id":573,"token":" for",'
    b'"bytes":[32,102,111,114],"logprob":-0.7399994730949402,"top_logprobs":[{"id":573,'
    b'"token":" for","bytes":[32,102,111,114],"logprob":-0.7399994730949402}]}]},'
    b'"finish_reason":null}],"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":68.484,'
    b'"prompt_per_token_ms":17.121,"prompt_per_second":58.40780328251855,"predicted_n":3,'
    b'"predicted_ms":94.508,"predicted_per_token_ms":47.254,'
    b'"predicted_per_second":21.16222965251619}}\n\n'
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],'
    b'"created":1796155588,"model":"gemma","system_fingerprint":"b0-unknown",'
    b'"object":"text_completion","usage":{"completion_tokens":3,"prompt_tokens":4,"total_tokens":7,'
    b'"prompt_tokens_details":{"cached_tokens":0}},'
    b'"id":"chatcmpl-GDQqVER5lMuusLYXzKRxJiSigK3Bh5a2","timings":{"cache_n":0,"prompt_n":4,'
    b'"prompt_ms":68.484,"prompt_per_token_ms":17.121,"prompt_per_second":58.40780328251855,'
    b'"predicted_n":3,"predicted_ms":94.508,"predicted_per_token_ms":47.254,'
    b'"predicted_per_second":21.16222965251619}}\n\n'
    b'data: [DONE]\n\n'
)
COMPLETIONS_ANSWER = (
    b'{"choices":[{"text":" the limit for","index":0,"logprobs":{"content":[{"id":506,'
    b'"token":" the","bytes":[32,116,104,101],"logprob":-0.9322661757469177,'
    b'"top_logprobs":[{"id":506,"token":" the","bytes":[32,116,104,101],'
    b'"logprob":-0.9322661757469177}]},{"id":4576,"token":" limit","bytes":[32,108,105,109,105,'
    b'116],"logprob":-0.006418097298592329,"top_logprobs":[{"id":4576,"token":" limit","bytes":[32,'
    b'108,105,109,105,116],"logprob":-0.006418097298592329}]},{"id":573,"token":" for","bytes":[32,'
    b'102,111,114],"logprob":-0.7399994730949402,"top_logprobs":[{"id":573,"token":" for",'
    b'"bytes":[32,102,111,114],"logprob":-0.7399994730949402}]}]},"finish_reason":"length"}],'
    b'"created":1796155588,"model":"gemma","system_fingerprint":"b0-unknown",'
    b'"object":"text_completion","usage":{"completion_tokens":3,"prompt_tokens":4,"total_tokens":7,'
    b'"prompt_tokens_details":{"cached_tokens":0}},'
    b'"id":"chatcmpl-GDQqVER5lMuusLYXzKRxJiSigK3Bh5a2","timings":{"cache_n":0,"prompt_n":4,'
    b'"prompt_ms":68.484,"prompt_per_token_ms":17.121,"prompt_per_second":58.40780328251855,'
    b'"predicted_n":3,"predicted_ms":94.508,"predicted_per_token_ms":47.254,'
    b'"predicted_per_second":21.16222965251619}}'
)

# POST /v1/completions, the same grammar and limit as NATIVE_TAIL
COMPLETIONS_TAIL_SSE = (
    b'data: {"choices":[{"text":"a","index":0,"logprobs":null,"finish_reason":null}],'
    b'"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":86.073,"prompt_per_token_ms":21.51825,'
    b'"prompt_per_second":46.47218059089378,"predicted_n":1,"predicted_ms":0.001,'
    b'"predicted_per_token_ms":0.0,"predicted_per_second":0.0}}\n\n'
    b'data: {"choices":[{"text":"b","index":0,"logprobs":null,"finish_reason":null}],'
    b'"timings":{"cache_n":0,"prompt_n":4,"prompt_ms":86.073,"prompt_per_token_ms":21.51825,'
    b'"prompt_per_second":46.47218059089378,"predicted_n":2,"predicted_ms":70.274,'
    b'"predicted_per_token_ms":70.274,"predicted_per_second":14.230013945413667}}\n\n'
    b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],'
    b'"created":1796155588,"model":"gemma","system_fingerprint":"b0-unknown",'
    b'"object":"text_completion","usage":{"completion_tokens":4,"prompt_tokens":4,"total_tokens":8,'
    b'"prompt_tokens_details":{"cached_tokens":0}},'
    b'"id":"chatcmpl-w8EOE8H7eZ0Ad49S2DrNHSqmyb6V7XnV","timings":{"cache_n":0,"prompt_n":4,'
    b'"prompt_ms":86.073,"prompt_per_token_ms":21.51825,"prompt_per_second":46.47218059089378,'
    b'"predicted_n":4,"predicted_ms":207.283,"predicted_per_token_ms":69.09433333333332,'
    b'"predicted_per_second":14.472966909973323}}\n\n'
    b'data: [DONE]\n\n'
)
COMPLETIONS_TAIL_ANSWER = (
    b'{"choices":[{"text":"ab\xef\xbf\xbd","index":0,"logprobs":null,"finish_reason":"length"}],'
    b'"created":1796155588,"model":"gemma","system_fingerprint":"b0-unknown",'
    b'"object":"text_completion","usage":{"completion_tokens":4,"prompt_tokens":4,"total_tokens":8,'
    b'"prompt_tokens_details":{"cached_tokens":0}},'
    b'"id":"chatcmpl-w8EOE8H7eZ0Ad49S2DrNHSqmyb6V7XnV","timings":{"cache_n":0,"prompt_n":4,'
    b'"prompt_ms":86.073,"prompt_per_token_ms":21.51825,"prompt_per_second":46.47218059089378,'
    b'"predicted_n":4,"predicted_ms":207.283,"predicted_per_token_ms":69.09433333333332,'
    b'"predicted_per_second":14.472966909973323}}'
)

# POST /v1/chat/completions {"messages": [user "Say hello"], "max_tokens": 3}
CHAT_SSE = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Say"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" hello"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"<"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796155589,'
    b'"id":"chatcmpl-wJpxS6hpv1YbdZxqaFG1oEDehTSmcT5m","model":"gemma",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"created":1796155589,"id":"chatcmpl-wJpxS6hpv1YbdZxqaFG1oEDehTSmcT5m",'
    b'"model":"gemma","system_fingerprint":"b0-unknown","object":"chat.completion.chunk",'
    b'"usage":{"completion_tokens":3,"prompt_tokens":26,"total_tokens":29,'
    b'"prompt_tokens_details":{"cached_tokens":21}},"timings":{"cache_n":21,"prompt_n":5,'
    b'"prompt_ms":66.695,"prompt_per_token_ms":13.338999999999999,'
    b'"prompt_per_second":74.96813854112003,"predicted_n":3,"predicted_ms":92.029,'
    b'"predicted_per_token_ms":46.0145,"predicted_per_second":21.732280042160625}}\n\n'
    b'data: [DONE]\n\n'
)
CHAT_ANSWER = (
    b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant",'
    b'"content":"Say hello<"}}],"created":1796155589,"model":"gemma",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion","usage":{"completion_tokens":3,'
    b'"prompt_tokens":26,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":21}},'
    b'"id":"chatcmpl-wJpxS6hpv1YbdZxqaFG1oEDehTSmcT5m","timings":{"cache_n":21,"prompt_n":5,'
    b'"prompt_ms":66.695,"prompt_per_token_ms":13.338999999999999,'
    b'"prompt_per_second":74.96813854112003,"predicted_n":3,"predicted_ms":92.029,'
    b'"predicted_per_token_ms":46.0145,"predicted_per_second":21.732280042160625}}'
)

# POST /v1/chat/completions, "yes" grammar with ignore_eos as NATIVE_ERROR
CHAT_ERROR_SSE = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"y"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"e"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"s"}}]}\n\n'
    b'data: {"error":{"code":500,'
    b'"message":"got exception: Unexpected empty grammar stack after accepting piece: <unused32> ('
    b'38)","type":"server_error"}}\n\n'
)
CHAT_ERROR_ANSWER = (
    b'{"error":{"code":500,'
    b'"message":"got exception: Unexpected empty grammar stack after accepting piece: <unused32> ('
    b'38)","type":"server_error"}}'
)

# POST /v1/chat/completions with a get_weather tool and two earlier calls in the
# conversation, on a server with a Qwen-style chat template: two parallel tool calls
CHAT_TOOLS_SSE = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"id":"GPcyM70i5oxqk6AmvV5z6BZOaOathXtT","type":"function","function":{"name":"get_weather",'
    b'"arguments":"{"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"\\""}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"city"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"\\":"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":" \\""}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"Paris"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"\\"}"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,'
    b'"id":"tobgkw4rfsbIs34wT2NDRCWd1eAvHryt","type":"function","function":{"name":"get_weather",'
    b'"arguments":"{"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,'
    b'"function":{"arguments":"\\""}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,'
    b'"function":{"arguments":"city"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,'
    b'"function":{"arguments":"\\":"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,'
    b'"function":{"arguments":" \\""}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,'
    b'"function":{"arguments":"Rome"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":1,'
    b'"function":{"arguments":"\\"}"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796155561,'
    b'"id":"chatcmpl-3htYwiawacSWFlf6RV7aL9hyeP0SkSng","model":"gemma",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"created":1796155561,"id":"chatcmpl-3htYwiawacSWFlf6RV7aL9hyeP0SkSng",'
    b'"model":"gemma","system_fingerprint":"b0-unknown","object":"chat.completion.chunk",'
    b'"usage":{"completion_tokens":60,"prompt_tokens":437,"total_tokens":497,'
    b'"prompt_tokens_details":{"cached_tokens":432}},"timings":{"cache_n":432,"prompt_n":5,'
    b'"prompt_ms":80.689,"prompt_per_token_ms":16.1378,"prompt_per_second":61.96631511110561,'
    b'"predicted_n":60,"predicted_ms":2787.248,"predicted_per_token_ms":47.24149152542373,'
    b'"predicted_per_second":21.167832930546545}}\n\n'
    b'data: [DONE]\n\n'
)
CHAT_TOOLS_ANSWER = (
    b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"",'
    b'"tool_calls":[{"type":"function","function":{"name":"get_weather",'
    b'"arguments":"{\\"city\\": \\"Paris\\"}"},"id":"GPcyM70i5oxqk6AmvV5z6BZOaOathXtT"},'
    b'{"type":"function","function":{"name":"get_weather","arguments":"{\\"city\\": \\"Rome\\"}"},'
    b'"id":"tobgkw4rfsbIs34wT2NDRCWd1eAvHryt"}]}}],"created":1796155561,"model":"gemma",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion","usage":{"completion_tokens":60,'
    b'"prompt_tokens":437,"total_tokens":497,"prompt_tokens_details":{"cached_tokens":432}},'
    b'"id":"chatcmpl-3htYwiawacSWFlf6RV7aL9hyeP0SkSng","timings":{"cache_n":432,"prompt_n":5,'
    b'"prompt_ms":80.689,"prompt_per_token_ms":16.1378,"prompt_per_second":61.96631511110561,'
    b'"predicted_n":60,"predicted_ms":2787.248,"predicted_per_token_ms":47.24149152542373,'
    b'"predicted_per_second":21.167832930546545}}'
)

# POST /v1/chat/completions on a server with the DeepSeek-R1 template (thinking forced
# open), grammar 'root ::= "Hmm.\n</think>\n\nHello"': reasoning, then content
CHAT_REASONING_SSE = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
    b'"content":null}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"\\nH"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"m"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"m"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"."}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"\\n"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\\n"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\\n"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"H"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"e"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"ll"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"o"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"created":1796155581,'
    b'"id":"chatcmpl-iJlATf9k8iPSSPvwV3qfgUTfSkMMhDb1","model":"gemma",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"created":1796155581,"id":"chatcmpl-iJlATf9k8iPSSPvwV3qfgUTfSkMMhDb1",'
    b'"model":"gemma","system_fingerprint":"b0-unknown","object":"chat.completion.chunk",'
    b'"usage":{"completion_tokens":16,"prompt_tokens":15,"total_tokens":31,'
    b'"prompt_tokens_details":{"cached_tokens":10}},"timings":{"cache_n":10,"prompt_n":5,'
    b'"prompt_ms":102.608,"prompt_per_token_ms":20.5216,"prompt_per_second":48.729143926399495,'
    b'"predicted_n":16,"predicted_ms":1059.809,"predicted_per_token_ms":70.65393333333333,'
    b'"predicted_per_second":14.153493695562124}}\n\n'
    b'data: [DONE]\n\n'
)
CHAT_REASONING_ANSWER = (
    b'{"choices":[{"finish_reason":"stop","index":0,"message":{"role":"assistant",'
    b'"content":"\\n\\nHello","reasoning_content":"\\nHmm.\\n"}}],"created":1796155581,'
    b'"model":"gemma","system_fingerprint":"b0-unknown","object":"chat.completion",'
    b'"usage":{"completion_tokens":16,"prompt_tokens":15,"total_tokens":31,'
    b'"prompt_tokens_details":{"cached_tokens":10}},'
    b'"id":"chatcmpl-iJlATf9k8iPSSPvwV3qfgUTfSkMMhDb1","timings":{"cache_n":10,"prompt_n":5,'
    b'"prompt_ms":102.608,"prompt_per_token_ms":20.5216,"prompt_per_second":48.729143926399495,'
    b'"predicted_n":16,"predicted_ms":1059.809,"predicted_per_token_ms":70.65393333333333,'
    b'"predicted_per_second":14.153493695562124}}'
)

CAPTURES = {
    "native": ("completion", NATIVE_SSE, NATIVE_ANSWER),
    "native_tail": ("completion", NATIVE_TAIL_SSE, NATIVE_TAIL_ANSWER),
    "infill": ("infill", NATIVE_SSE, NATIVE_ANSWER),  # infill streams native shapes
    "completions": ("v1/completions", COMPLETIONS_SSE, COMPLETIONS_ANSWER),
    "completions_tail": ("v1/completions", COMPLETIONS_TAIL_SSE, COMPLETIONS_TAIL_ANSWER),
    "chat": ("v1/chat/completions", CHAT_SSE, CHAT_ANSWER),
    "chat_tools": ("v1/chat/completions", CHAT_TOOLS_SSE, CHAT_TOOLS_ANSWER),
    "chat_reasoning": ("v1/chat/completions", CHAT_REASONING_SSE, CHAT_REASONING_ANSWER),
}
ERRORS = {
    "native_error": ("completion", NATIVE_ERROR_SSE, NATIVE_ERROR_ANSWER),
    "chat_error": ("v1/chat/completions", CHAT_ERROR_SSE, CHAT_ERROR_ANSWER),
}
PAYLOAD = {"prompt": "x"}
EVENT_END = b"\n\n"


def assemble(route: str, chunks: list[bytes], payload: dict[str, object] | None = None,
             ) -> Assembler:
    assembler = Assembler(route, payload or PAYLOAD)
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler


def events(sse: bytes) -> list[bytes]:
    """The stream's events, each with its blank line."""
    return [event + EVENT_END for event in sse.split(EVENT_END) if event]


# --- applies / refusal ---

@pytest.mark.parametrize(("route", "payload"), [
    ("completion", {"prompt": "The sky is", "n_predict": 8}),
    ("completion", {"prompt": "x", "stream": False, "n_probs": 3, "post_sampling_probs": True}),
    ("completion", {"prompt": [2, 818, 7217]}),              # tokens: one prompt
    ("completion", {"prompt": [2, "The sky is"]}),           # mixed: one prompt
    ("completion", {"prompt": ["The sky is"]}),              # a list of one prompt
    ("completion", {"prompt": "x", "stop": [], "response_fields": [], "n": 1}),
    ("completion", {"prompt": "x", "stop": [""]}),           # llama.cpp drops empty words
    ("infill", {"input_prefix": "def f():", "input_suffix": "\n"}),
    ("v1/completions", {"prompt": "x", "max_tokens": 8, "logprobs": 2}),
    ("v1/completions", {"prompt": "x", "return_tokens": True}),  # not in OpenAI answers
    ("v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}),
    ("v1/chat/completions", {"messages": [], "logprobs": False, "stream": None}),
])
def test_applies(route: str, payload: dict[str, object]) -> None:
    assert refusal(route, payload) is None
    assert applies(route, payload)


@pytest.mark.parametrize(("route", "payload", "reason"), [
    ("embedding", {"content": "x"}, "not a generation route"),
    ("v1/embeddings", {"input": "x"}, "not a generation route"),
    ("completion", {"prompt": "x", "stream": True}, "the client asked for a stream"),
    ("v1/chat/completions", {"messages": [], "stream": True}, "the client asked for a stream"),
    ("v1/completions", {"prompt": "x", "n": 2}, "several choices (n)"),
    ("completion", {"prompt": "x", "n_cmpl": 2}, "several choices (n)"),
    ("v1/chat/completions", {"messages": [], "n": 3}, "several choices (n)"),
    ("completion", {"prompt": ["one", "two"]}, "several prompts"),
    ("v1/completions", {"prompt": [[1, 2], [3, 4]]}, "several prompts"),
    ("infill", {"input_prefix": "a", "prompt": ["one", "two"]}, "several prompts"),
    ("completion", {"prompt": "x", "stop": ["\n"]}, "stop words"),
    ("v1/completions", {"prompt": "x", "stop": "END"}, "stop words"),
    ("v1/chat/completions", {"messages": [], "stop": ["", "Q:"]}, "stop words"),
    ("completion", {"prompt": "x", "response_fields": ["content"]}, "response_fields"),
    ("completion", {"prompt": "x", "return_tokens": True}, "return_tokens"),
    ("infill", {"input_prefix": "a", "return_tokens": True}, "return_tokens"),
    ("v1/chat/completions", {"messages": [], "logprobs": True}, "logprobs on chat"),
    ("v1/chat/completions", {"messages": [], "logprobs": True, "top_logprobs": 2},
     "logprobs on chat"),
    ("v1/chat/completions", {"messages": [], "n_probs": 2}, "logprobs on chat"),
])
def test_refuses(route: str, payload: dict[str, object], reason: str) -> None:
    assert refusal(route, payload) == reason
    assert not applies(route, payload)


def test_routes() -> None:
    assert frozenset({"completion", "infill", "v1/completions", "v1/chat/completions",
                      "v1/messages"}) == ROUTES


# --- upstream_payload ---

def test_upstream_payload_native_only_streams() -> None:
    payload = {"prompt": "x", "n_predict": 4, "stream": False, "n_probs": 2}
    out = upstream_payload("completion", payload)
    assert out == {"prompt": "x", "n_predict": 4, "stream": True, "n_probs": 2}
    assert payload["stream"] is False  # the client's payload is left alone
    assert upstream_payload("infill", {"input_prefix": "a"}) == {"input_prefix": "a",
                                                                 "stream": True}


def test_upstream_payload_chat_asks_for_usage_and_merges_options() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert upstream_payload("v1/chat/completions", {"messages": messages}) == {
        "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    options = {"include_usage": False, "continuous_usage_stats": True}
    payload = {"messages": messages, "stream_options": options}
    out = upstream_payload("v1/chat/completions", payload)
    assert out["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert options == {"include_usage": False, "continuous_usage_stats": True}
    assert upstream_payload("v1/chat/completions",
                            {"stream_options": None})["stream_options"] == {"include_usage": True}


def test_upstream_payload_completions_counts_tokens() -> None:
    out = upstream_payload("v1/completions", {"prompt": "x", "max_tokens": 4, "logprobs": 1})
    assert out == {"prompt": "x", "max_tokens": 4, "logprobs": 1, "stream": True,
                   "stream_options": {"include_usage": True}, "timings_per_token": True}


# --- assembling the captured streams ---

@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_assembles_llamacpp_answer_byte_for_byte(name: str) -> None:
    route, sse, answer = CAPTURES[name]
    assembler = assemble(route, [sse])
    assert assembler.done and not assembler.failed
    assert assembler.result() == (200, answer)
    assert assembler.result() == (200, answer)  # result() can be asked again


def test_dumps_is_compact_utf8_in_insertion_order() -> None:
    assert dumps({"b": 1.0, "a": ["\u00e9\n", None, -3.4028234663852886e+38]}) == (
        '{"b":1.0,"a":["\u00e9\\n",null,-3.4028234663852886e+38]}'.encode())


def test_native_details() -> None:
    answer = json.loads(assemble("completion", [NATIVE_SSE]).result()[1])
    final = json.loads(events(NATIVE_SSE)[-1][6:])
    assert answer["content"] == " the limit for"
    assert answer["generation_settings"]["stream"] is False       # the stream said true
    assert [p["id"] for p in answer["completion_probabilities"]] == [506, 4576, 573]
    assert list(answer) == [*final, "completion_probabilities"]    # llama.cpp's order
    assert answer["tokens"] == [] and answer["stop_type"] == "limit"


def test_tokens_ending_inside_a_character_become_one_replacement_character() -> None:
    """Generation stopped after 2 of the 4 bytes of U+13000: llama.cpp never streams them,
    and its non-streamed answer writes them as U+FFFD."""
    native = json.loads(assemble("completion", [NATIVE_TAIL_SSE]).result()[1])
    assert native["content"] == "ab\ufffd"
    completions = json.loads(assemble("v1/completions", [COMPLETIONS_TAIL_SSE]).result()[1])
    assert completions["choices"][0]["text"] == "ab\ufffd"


def test_no_replacement_character_when_the_chunks_do_not_count_tokens() -> None:
    """Without per-token timings (a stream not asked for with upstream_payload) the gap
    cannot be told from a stream that had none."""
    untimed = b"".join(
        event.replace(b',"timings":', b',"x":') if b'"finish_reason":null' in event else event
        for event in events(COMPLETIONS_TAIL_SSE))
    completions = json.loads(assemble("v1/completions", [untimed]).result()[1])
    assert completions["choices"][0]["text"] == "ab"


def test_chat_tool_calls_and_reasoning() -> None:
    tools = json.loads(assemble("v1/chat/completions", [CHAT_TOOLS_SSE]).result()[1])
    message = tools["choices"][0]["message"]
    assert message["content"] == ""   # this build: "" (not null) beside tool calls
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message["tool_calls"]] == [("get_weather", {"city": "Paris"}),
                                                ("get_weather", {"city": "Rome"})]
    assert [list(c) for c in message["tool_calls"]] == [["type", "function", "id"]] * 2
    reasoning = json.loads(assemble("v1/chat/completions", [CHAT_REASONING_SSE]).result()[1])
    assert reasoning["choices"][0]["message"] == {
        "role": "assistant", "content": "\n\nHello", "reasoning_content": "\nHmm.\n"}
    assert reasoning["object"] == "chat.completion"


# --- SSE framing ---

@pytest.mark.parametrize("name", ["native_tail", "chat", "native_error"])
def test_every_split_point(name: str) -> None:
    route, sse, answer = (CAPTURES | ERRORS)[name]
    status = 500 if name.endswith("error") else 200
    for cut in range(len(sse) + 1):
        assert assemble(route, [sse[:cut], sse[cut:]]).result() == (status, answer), cut


@pytest.mark.parametrize("name", sorted(CAPTURES | ERRORS))
def test_byte_by_byte_and_random_splits(name: str) -> None:
    route, sse, answer = (CAPTURES | ERRORS)[name]
    status = 500 if name.endswith("error") else 200
    one_by_one = [sse[i:i + 1] for i in range(len(sse))]
    assert assemble(route, one_by_one).result() == (status, answer)
    rng = random.Random(name)
    for _ in range(20):
        chunks, at = [], 0
        while at < len(sse):
            size = rng.choice((1, 2, 3, 7, 64, 500, 4096))
            chunks.append(sse[at:at + size])
            at += size
        assert assemble(route, chunks).result() == (status, answer)


def test_characters_split_across_chunks() -> None:
    sse = NATIVE_SSE.replace(b'"content":" limit"', '"content":" l\u00efmit \U0001f600"'.encode())
    answer = NATIVE_ANSWER.replace(b'"content":" the limit for"',
                                   '"content":" the l\u00efmit \U0001f600 for"'.encode())
    start = sse.index("\u00ef".encode())
    for cut in range(start - 1, start + 12):  # inside the 2-byte and the 4-byte character
        assert assemble("completion", [sse[:cut], sse[cut:]]).result() == (200, answer), cut


@pytest.mark.parametrize("separator", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends(separator: bytes) -> None:
    for route, sse, answer in CAPTURES.values():
        framed = sse.replace(b"\n", separator)  # JSON escapes its own newlines
        assert assemble(route, [framed]).result() == (200, answer)
        one_by_one = [framed[i:i + 1] for i in range(len(framed))]
        assert assemble(route, one_by_one).result() == (200, answer)


def test_comments_and_pings_are_ignored() -> None:
    for route, sse, answer in CAPTURES.values():
        noisy = b": ping\n\n" + b": keepalive\n\n".join(events(sse))
        noisy = noisy.replace(b"data: ", b": a comment inside an event\ndata: ", 1)
        assert assemble(route, [noisy]).result() == (200, answer)


def test_other_fields_and_multiline_data() -> None:
    sse = NATIVE_SSE.replace(b'data: {"index":0,"content":" limit",',
                             b'event: message\nid: 7\nretry: 10\ndata: {"index":0,\n'
                             b'data:"content":" limit",')
    assert assemble("completion", [sse]).result() == (200, NATIVE_ANSWER)


def test_data_null_between_tasks_is_skipped() -> None:
    first, *rest = events(NATIVE_SSE)
    sse = first + b"data: null\n\n" + b"".join(rest)
    assert assemble("completion", [sse]).result() == (200, NATIVE_ANSWER)


def test_bytes_after_the_terminal_event_are_ignored() -> None:
    assembler = assemble("completion", [NATIVE_SSE, b'data: {"error":{"code":500}}\n\n'])
    assert assembler.result() == (200, NATIVE_ANSWER)
    assembler = assemble("v1/chat/completions", [CHAT_SSE, b"data: not json\n\n"])
    assert assembler.result() == (200, CHAT_ANSWER)


# --- errors ---

@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_event_mid_stream(name: str) -> None:
    route, sse, answer = ERRORS[name]
    assembler = assemble(route, [sse])
    assert assembler.failed and assembler.done
    assert assembler.result() == (500, answer)  # what llama.cpp answers non-streamed


def test_error_field_of_older_builds() -> None:
    sse = (events(NATIVE_SSE)[0] +
           b'error: {"code":400,"message":"boom","type":"invalid_request_error"}\n\n')
    assembler = assemble("completion", [sse])
    assert assembler.failed and assembler.done
    assert assembler.result() == (
        400, b'{"error":{"code":400,"message":"boom","type":"invalid_request_error"}}')


def test_error_without_a_usable_code() -> None:
    assembler = assemble("v1/completions", [b'data: {"error":{"message":"x"}}\n\n'])
    assert assembler.result() == (500, b'{"error":{"message":"x"}}')
    assembler = assemble("v1/completions", [b"error: not json\n\n"])
    assert assembler.result() == (
        500, b'{"error":{"code":500,"message":"not json","type":"server_error"}}')


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_stream_cut_before_its_terminal_event(name: str) -> None:
    route, sse, _ = CAPTURES[name]
    whole = events(sse)
    for cut in (b"", whole[0], b"".join(whole[:-1]), b"".join(whole)[:-1],
                b"".join(whole)[:-10]):
        assembler = assemble(route, [cut])
        assert not assembler.done and not assembler.failed
        with pytest.raises(IncompleteStream):
            assembler.result()


def test_done_without_a_finishing_chunk() -> None:
    assembler = assemble("v1/chat/completions", [events(CHAT_SSE)[0], b"data: [DONE]\n\n"])
    assert assembler.done
    with pytest.raises(IncompleteStream, match="finishing chunk"):
        assembler.result()


@pytest.mark.parametrize("event", [b"data: {not json\n\n", b"data: [1, 2]\n\n"])
def test_malformed_event(event: bytes) -> None:
    assembler = assemble("completion", [events(NATIVE_SSE)[0], event, NATIVE_SSE])
    assert not assembler.done
    with pytest.raises(IncompleteStream, match="upstream sent"):
        assembler.result()


def test_unknown_route() -> None:
    with pytest.raises(ValueError, match="embedding"):
        Assembler("embedding", {})


# --- delta shapes the captures do not show ---

def chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    event = {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], **extra}
    return b"data: " + json.dumps(event).encode() + EVENT_END


def test_tool_call_whose_name_grows_and_has_no_id() -> None:
    """llama.cpp resends the whole name when it grows; a call without an id gets none."""
    sse = b"".join([
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "Let me check."}),
        chunk({"tool_calls": [{"index": 0, "type": "function",
                               "function": {"name": "get", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "get_weather",
                                                        "arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}),
        chunk({}, "tool_calls", created=1, id="chatcmpl-1", model="m",
              system_fingerprint="b1", object="chat.completion.chunk"),
        b'data: {"choices":[],"usage":{"completion_tokens":9,"prompt_tokens":3,'
        b'"total_tokens":12},"timings":{"predicted_n":9}}\n\n',
        b"data: [DONE]\n\n",
    ])
    answer = json.loads(assemble("v1/chat/completions", [sse]).result()[1])
    assert answer == {
        "choices": [{"finish_reason": "tool_calls", "index": 0, "message": {
            "role": "assistant", "content": "Let me check.",
            "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}}],
        "created": 1, "model": "m", "system_fingerprint": "b1", "object": "chat.completion",
        "usage": {"completion_tokens": 9, "prompt_tokens": 3, "total_tokens": 12},
        "id": "chatcmpl-1", "timings": {"predicted_n": 9}}
    assert list(answer) == ["choices", "created", "model", "system_fingerprint", "object",
                            "usage", "id", "timings"]


def test_chat_without_a_usage_chunk_and_with_logprobs() -> None:
    """Older builds put usage in the finishing chunk; logprobs follow the message."""
    probs = [{"id": 1, "token": "a", "bytes": [97], "logprob": -0.5, "top_logprobs": []}]
    sse = b"".join([
        chunk({"reasoning_content": "hm"}),
        b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"a"},'
        b'"logprobs":{"content":' + json.dumps(probs).encode() + b"}}]}\n\n",
        chunk({}, "stop", id="x", usage={"completion_tokens": 2}, extra_field=True),
        b"data: [DONE]\n\n",
    ])
    answer = json.loads(assemble("v1/chat/completions", [sse]).result()[1])
    assert answer == {
        "choices": [{"finish_reason": "stop", "index": 0,
                     "message": {"role": "assistant", "content": "a",
                                 "reasoning_content": "hm"},
                     "logprobs": {"content": probs}}],
        "object": "chat.completion", "usage": {"completion_tokens": 2}, "id": "x",
        "extra_field": True}


def test_completions_usage_in_a_separate_chunk() -> None:
    """If a build sends usage after the finishing chunk, as chat does, it is merged."""
    first, *rest = events(COMPLETIONS_SSE)
    finishing = json.loads(rest[-2][6:])
    usage, timings = finishing.pop("usage"), finishing.pop("timings")
    sse = (first + b"".join(rest[:-2]) + b"data: " + json.dumps(finishing).encode() + EVENT_END
           + b"data: " + json.dumps({"choices": [], "usage": usage, "timings": timings}).encode()
           + EVENT_END + b"data: [DONE]\n\n")
    answer = json.loads(assemble("v1/completions", [sse]).result()[1])
    assert answer == json.loads(COMPLETIONS_ANSWER)


# --- Anthropic Messages ---

def message_events(*events: dict[str, object]) -> bytes:
    return b"".join(b"event: " + str(e["type"]).encode() + b"\ndata: " + dumps(e) + b"\n\n"
                    for e in events)


MESSAGE_SSE = message_events(
    {"type": "message_start", "message": {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "content": [],
        "model": "gemma", "stop_reason": None, "stop_sequence": None,
        "usage": {"cache_read_input_tokens": 3, "input_tokens": 20, "output_tokens": 0}}},
    {"type": "content_block_start", "index": 0,
     "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0,
     "delta": {"type": "thinking_delta", "thinking": "The user wants "}},
    {"type": "content_block_delta", "index": 0,
     "delta": {"type": "thinking_delta", "thinking": "the weather."}},
    {"type": "content_block_delta", "index": 0,
     "delta": {"type": "signature_delta", "signature": "sig"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1,
     "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                       "input": {}}},
    {"type": "content_block_delta", "index": 1,
     "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}},
    {"type": "content_block_delta", "index": 1,
     "delta": {"type": "input_json_delta", "partial_json": 'ris \u00e9"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 17}},
    {"type": "message_stop"},
)
MESSAGE_ANSWER = {
    "id": "chatcmpl-1", "type": "message", "role": "assistant",
    "content": [{"type": "thinking", "thinking": "The user wants the weather.",
                 "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris \u00e9"}}],
    "model": "gemma", "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"cache_read_input_tokens": 3, "input_tokens": 20, "output_tokens": 17}}


def test_a_message_from_its_events_split_anywhere() -> None:
    for size in (1, 7, 64, len(MESSAGE_SSE)):
        assembler = Assembler("v1/messages", {})
        for i in range(0, len(MESSAGE_SSE), size):
            assembler.feed(MESSAGE_SSE[i:i + size])
        assert assembler.done
        status, body = assembler.result()
        assert status == 200 and json.loads(body) == MESSAGE_ANSWER


def test_a_message_stream_without_message_stop_is_incomplete() -> None:
    assembler = Assembler("v1/messages", {})
    assembler.feed(MESSAGE_SSE[:MESSAGE_SSE.index(b"event: message_delta")])
    with pytest.raises(IncompleteStream):
        assembler.result()


def test_a_tool_input_that_is_not_json_breaks_the_stream() -> None:
    broken = MESSAGE_SSE.replace(dumps('ris \u00e9"}'), dumps("ris"))
    assert broken != MESSAGE_SSE
    assembler = Assembler("v1/messages", {})
    assembler.feed(broken)
    with pytest.raises(IncompleteStream, match="not JSON"):
        assembler.result()
