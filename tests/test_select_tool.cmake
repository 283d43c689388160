# test_select_tool runs the kvevict-select program as a separate process and
# needs its path. The tools folder is added after the tests folder, so the
# target does not exist yet here; KVEVICT_BUILD_TOOLS says whether it will.
if(KVEVICT_BUILD_TOOLS AND TARGET test_select_tool)
  target_compile_definitions(test_select_tool PRIVATE KVEVICT_SELECT_TOOL="$<TARGET_FILE:kvevict-select>")
  add_dependencies(test_select_tool kvevict-select)
endif()
