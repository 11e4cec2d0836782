  .text
  .globl emu_switch
  .type emu_switch, @function
# void emu_switch(void** save_sp, void* next_sp): saves the callee-saved registers on this stack,
# stores its pointer, and resumes the stack at next_sp.
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .section .note.GNU-stack,"",@progbits
