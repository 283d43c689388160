# test_eval_cli runs the kvevict-eval program as a separate process and needs
# its path. The examples folder is added after the tests folder, so the target
# does not exist yet here; KVEVICT_BUILD_EXAMPLES says whether it will.
if(KVEVICT_BUILD_EXAMPLES AND TARGET test_eval_cli)
  target_compile_definitions(test_eval_cli PRIVATE KVEVICT_EVAL_PROGRAM="$<TARGET_FILE:kvevict-eval>")
  add_dependencies(test_eval_cli kvevict-eval)
endif()
